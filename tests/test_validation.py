"""Reply validation before aggregation: what is excluded, and why."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common import records as rk
from server.validation import validate_train_replies
from tests.flower_helpers import task_identity

SENT = {"head.weight": np.zeros((2, 4), np.float32), "head.bias": np.zeros(2, np.float32)}


def reply(node: int, arrays: dict[str, np.ndarray], n: float = 10) -> Message:
    with task_identity(node_id=0):
        out = Message(RecordDict({rk.ARRAYS: ArrayRecord({k: Array(v) for k, v in SENT.items()})}),
                      dst_node_id=node, message_type="train")
    content = RecordDict({rk.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          rk.METRICS: MetricRecord({rk.NUM_EXAMPLES: n})})
    with task_identity(node_id=node):
        return Message(content, reply_to=out)


def honest(scale: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in SENT.items()}


def reasons(replies: list[Message], declared: dict[int, int] | None = None,
            ratio: float = 10.0) -> dict[int, str | None]:
    sizes = declared or {r.metadata.src_node_id: 50 for r in replies}
    return {v.node_id: v.reason
            for v in validate_train_replies(SENT, replies, sizes, ratio)}


def test_honest_replies_pass() -> None:
    replies = [reply(i, honest(seed=i)) for i in range(1, 5)]
    assert set(reasons(replies).values()) == {None}


def test_scaled_update_is_excluded_by_the_norm_bound() -> None:
    replies = [reply(i, honest(seed=i)) for i in range(1, 5)]
    replies.append(reply(9, {k: 100 * v for k, v in honest(seed=9).items()}))
    got = reasons(replies)
    assert got[9] is not None and "exceeds 10 x the round median" in got[9]
    assert all(got[i] is None for i in range(1, 5))


def test_norm_bound_off_keeps_scaled_update() -> None:
    replies = [reply(i, honest(seed=i)) for i in range(1, 5)]
    replies.append(reply(9, {k: 100 * v for k, v in honest(seed=9).items()}))
    assert reasons(replies, ratio=0)[9] is None


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"head.weight": np.zeros((2, 4), np.float32)}, "missing ['head.bias']"),
        ({**SENT, "backbone.0.weight": np.zeros(3, np.float32)},
         "unexpected ['backbone.0.weight']"),
        ({**SENT, "head.bias": np.zeros(3, np.float32)}, "has shape (3,), expected (2,)"),
        ({**SENT, "head.bias": np.array([np.nan, 0], np.float32)}, "NaN or infinite"),
        ({**SENT, "head.bias": np.zeros(2, np.int64)}, "dtype int64, expected float32 or float64"),
        # Flower averages in the first reply's dtype: one float16 reply would round them all
        ({**SENT, "head.bias": np.zeros(2, np.float16)},
         "dtype float16, expected float32 or float64"),
    ],
)
def test_malformed_tensors_are_excluded(arrays: dict[str, np.ndarray], expected: str) -> None:
    assert expected in str(reasons([reply(3, arrays)])[3])


def test_a_tensor_that_does_not_decode_or_an_extra_record_is_excluded_not_raised() -> None:
    undecodable = reply(3, honest())
    good = undecodable.content.array_records[rk.ARRAYS]["head.bias"]
    undecodable.content[rk.ARRAYS]["head.bias"] = Array(good.dtype, tuple(good.shape),
                                                        good.stype, b"not a .npy file")
    extra = reply(4, honest())
    extra.content["junk"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    got = reasons([undecodable, extra, reply(5, honest())])
    assert got[3] == "tensor 'head.bias' does not decode as an array (ValueError)"
    assert got[4] == "unexpected array records ['junk']"
    assert got[5] is None


def test_a_train_reply_without_a_metric_every_reply_carries_is_excluded() -> None:
    """The strategy averages the same metric keys over every reply: a missing one raised."""
    got = {v.node_id: v.reason for v in validate_train_replies(
        SENT, [reply(3, honest())], {3: 50}, 10.0, required=(rk.NUM_EXAMPLES, "loss"))}
    assert got[3] == "reply lacks the metrics ['loss']"


@pytest.mark.parametrize(("n", "expected"), [(0, "expected > 0"), (-4, "expected > 0"),
                                              (51, "above the 50 training rows")])
def test_bad_example_counts_are_excluded(n: float, expected: str) -> None:
    assert expected in str(reasons([reply(3, honest(), n=n)], declared={3: 50})[3])


def test_count_at_the_declared_size_passes() -> None:
    assert reasons([reply(3, honest(), n=50)], declared={3: 50})[3] is None


def test_a_site_that_declared_no_size_is_excluded() -> None:
    assert "declared no usable training size" in str(reasons([reply(3, honest())],
                                                             declared={4: 50})[3])


@pytest.mark.parametrize("n", [math.inf, math.nan])
def test_a_count_that_is_not_a_finite_number_is_excluded(n: float) -> None:
    assert "not a number" in str(reasons([reply(3, honest(), n=n)])[3])


def test_the_absolute_norm_bound_holds_with_a_single_reply() -> None:
    huge = {k: v + 3e38 for k, v in SENT.items()}
    got = validate_train_replies(SENT, [reply(3, huge)], {3: 50}, 10.0, max_update_norm=1000.0)
    assert got[0].reason is not None and "exceeds the bound 1000" in got[0].reason


def _weights(replies: list[Message], **bounds: object) -> dict[int, float | None]:
    declared = {r.metadata.src_node_id: 10**310 for r in replies}  # the liars declared it too
    return {v.node_id: v.weight
            for v in validate_train_replies(SENT, replies, declared, 0, **bounds)}  # type: ignore[arg-type]


def test_weights_are_capped_by_the_enrolled_size_whatever_is_claimed() -> None:
    replies = [reply(1, honest(seed=1), n=40), reply(2, honest(seed=2), n=1e300),
               reply(3, honest(seed=3), n=1e308), reply(4, honest(seed=4), n=1e308)]
    got = _weights(replies, enrolled={1: 40, 2: 60, 3: 30, 4: 30})
    assert got == {1: 40.0, 2: 60.0, 3: 30.0, 4: 30.0}


def test_without_enrolment_a_configured_cap_then_the_round_median_bounds_the_weight() -> None:
    replies = [reply(1, honest(seed=1), n=40), reply(2, honest(seed=2), n=60),
               reply(3, honest(seed=3), n=1e300)]
    assert _weights(replies, max_examples=100)[3] == 100.0
    assert _weights(replies, max_examples_ratio=3.0) == {1: 40.0, 2: 60.0, 3: 180.0}


def test_sanitised_names_cannot_fake_a_log_line_or_a_path() -> None:
    from common.names import sanitise_name

    assert sanitise_name("hospital-a\n12:00 medfed.server: round 9/9") == \
        "hospital-a_12_00_medfed.server__round_9_9"
    assert sanitise_name("../../etc") == "_.._etc"
    assert sanitise_name("\x1b[32mok") == "__32mok"
    assert len(sanitise_name("x" * 500)) == 64


# --- the scores of a global model a site sends -------------------------------------------
def evaluate_reply(**metrics: float) -> Message:
    with task_identity(node_id=0):
        out = Message(RecordDict({}), dst_node_id=3, message_type="evaluate")
    with task_identity(node_id=3):
        return Message(RecordDict({rk.METRICS: MetricRecord(metrics)}), reply_to=out)


def honest_scores(classes: int) -> dict[str, float]:
    """What a site sends: `score` of its validation and test rows (NaN for undefined)."""
    from client.node import nan_for_none
    from common.scoring import OperatingPoint, score

    rng = np.random.default_rng(classes)
    y = np.arange(40) % classes
    out: dict[str, float] = {}
    for prefix in ("val-", "test-"):
        scores = score(rng.standard_normal((40, classes)), y, OperatingPoint())
        out.update({prefix + k: v for k, v in nan_for_none(scores).items()})
    return {**out, rk.NUM_EXAMPLES: 40.0}


SIZES = {"train": 100, "validation": 40, "test": 40}


@pytest.mark.parametrize("classes", [2, 5])
def test_a_sites_honest_scores_pass(classes: int) -> None:
    from server.validation import check_evaluate_reply

    assert check_evaluate_reply(evaluate_reply(**honest_scores(classes)), SIZES) is None


@pytest.mark.parametrize(("change", "fragment"), [
    ({"val-auc": 1e6}, "metric 'val-auc' is 1e+06, outside its range [0, 1]"),
    ({"test-loss": -1.0}, "metric 'test-loss' is -1, outside its range [0, inf]"),
    ({"val-brier": 2.5}, "'val-brier' is 2.5, outside its range [0, 2]"),
    ({"val-glory": 0.5}, "unknown metric 'val-glory'"),
    ({"bonus": 1.0}, "unexpected metric 'bonus'"),
    # counts that add up over sites: an overflow crashed the server's sum
    ({"val-positives": 1.7e308}, "'val-positives' is not a count of at most 'val-n' rows"),
    ({"test-positives": 41.0}, "'test-positives' is not a count of at most 'test-n' rows"),
    ({"val-n": 41.0}, "'val-n' is above the 40 validation rows the site declared"),
])
def test_scores_out_of_their_range_are_refused(change: dict[str, float], fragment: str) -> None:
    """One site's impossible figure would set the mean over sites, and `best`, alone."""
    from server.validation import check_evaluate_reply

    problem = check_evaluate_reply(evaluate_reply(**{**honest_scores(2), **change}), SIZES)
    assert problem is not None and fragment in problem


# --- site-model replies ------------------------------------------------------------------
def site_model_reply(**metrics: float) -> Message:
    from flwr.app import ConfigRecord

    values = {rk.SITE_KEPT_ADAPTED: 1.0, "steps": 5.0, "temperature": 1.2, "threshold": 0.4,
              "rows/train": 80.0, "site_model/validation/auc": 0.8,
              "site_model/test/auc": math.nan, "global/validation/auc": 0.7, **metrics}
    words = {"method": "fine-tune", "reason": "best on validation", "rule": "fixed:0.5",
             **{f"sha256/{n}": "ab" * 32 for n in ("backbone.safetensors", "head.safetensors",
                                                 "site_stats.json")}}
    with task_identity(node_id=0):
        out = Message(RecordDict({}), dst_node_id=3, message_type="query.adapt")
    content = RecordDict({rk.METRICS: MetricRecord(values),
                          rk.SITE_MODEL: ConfigRecord(words)})
    with task_identity(node_id=3):
        return Message(content, reply_to=out)


def test_a_well_formed_site_model_reply_is_read() -> None:
    from server.validation import check_site_model_reply, site_model_from_reply

    msg = site_model_reply()
    assert check_site_model_reply(msg) is None
    site, files = site_model_from_reply(msg)
    assert site["kept"] == "adapted" and site["steps"] == 5 and site["rows"] == {"train": 80}
    assert site["site_model"]["test"]["auc"] is None  # NaN: undefined, not a number
    assert set(files.values()) == {"ab" * 32}


@pytest.mark.parametrize(("metrics", "fragment"), [
    ({"steps": math.nan}, "'steps'"),
    ({"steps": -1.0}, "'steps'"),
    ({"steps": 2.5}, "'steps'"),
    ({rk.SITE_KEPT_ADAPTED: math.nan}, f"'{rk.SITE_KEPT_ADAPTED}'"),
    ({rk.SITE_KEPT_ADAPTED: 2.0}, f"'{rk.SITE_KEPT_ADAPTED}'"),
    ({"rows/train": math.nan}, "'rows/train'"),
    ({"rows/test": 1e12}, "'rows/test'"),
    ({"site_model/validation/auc": 7.0}, "'site_model/validation/auc' is 7, outside"),
    ({"global/test/auc_lo": -0.5}, "'global/test/auc_lo' is -0.5, outside"),
])
def test_a_site_model_reply_with_a_bad_count_or_flag_is_refused(metrics, fragment) -> None:
    from server.validation import check_site_model_reply

    problem = check_site_model_reply(site_model_reply(**metrics))
    assert problem is not None and fragment in problem


def test_an_error_the_superlink_writes_is_named_after_the_node_it_was_for() -> None:
    """"Node Unavailable" comes from the SuperLink's own node id: the log must still say which
    hospital did not answer."""
    from flwr.app import Error, Message, RecordDict

    from server.provisioning import _attribute_errors
    from tests.flower_helpers import task_identity

    with task_identity():
        sent = [Message(RecordDict(), dst_node_id=node, message_type="train")
                for node in (101, 202)]
        for i, msg in enumerate(sent):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's push sets it
        error = Message(Error(code=3, reason="Node Unavailable"), reply_to=sent[1])
        error.metadata.__dict__["_src_node_id"] = 1  # the SuperLink, not node 202
        _attribute_errors(sent, [error])
    assert error.metadata.src_node_id == 202


def test_a_run_stopped_on_purpose_is_one_sentence_not_a_traceback() -> None:
    import logging

    from server.provisioning import RunStopped
    from server.server_app import StopWithoutTraceback

    try:
        raise RunStopped("round 3: only 1 valid updates, at least 2 needed")
    except RunStopped as err:
        record = logging.LogRecord("flwr", logging.ERROR, __file__, 1,
                                   "%s raised an exception", ("ServerApp",),
                                   (type(err), err, err.__traceback__))
    assert StopWithoutTraceback().filter(record)
    text = logging.Formatter().format(record)
    assert text == "run stopped: round 3: only 1 valid updates, at least 2 needed"


def test_a_site_model_reply_with_interval_bounds_is_read_and_overlong_notes_are_refused() -> None:
    from flwr.app import ConfigRecord

    from server.validation import MAX_WORDS, check_site_model_reply

    msg = site_model_reply(**{"site_model/validation/auc_lo": 0.7,
                              "site_model/validation/auc_hi": 0.9})
    assert check_site_model_reply(msg) is None
    words = dict(msg.content.config_records[rk.SITE_MODEL])
    msg.content[rk.SITE_MODEL] = ConfigRecord({**words, "notes": "x" * (4 * MAX_WORDS + 1)})
    assert check_site_model_reply(msg) == (f"'notes' is not text of at most {4 * MAX_WORDS} "
                                           "characters")
