"""A malicious hospital cannot hurt the federation (`federation.faults.attack`).

The real ServerApp and ClientApp code in this process (no Ray), heart hospitals, with the
enrolment `medfed simulate` writes (each site's training rows). Every attack ends as an
excluded or bounded reply with a logged reason; none stops the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from client.client_app import make_client_app
from common import records as rk
from common.config_check import load_config
from common.data.federated import raw_sites
from common.registry import Registry
from server.federation import run_federation
from server.simulate import enrol_simulated
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings

FAST = ("federation.rounds=3", "federation.local.steps=10", "federation.adaptation.enabled=false",
        "federation.final_model=latest")


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


Rewrite = Callable[[str, RecordDict, int], None]  # (message type, reply content, round)


class RewritingGrid(InProcessGrid):
    """The first node's replies as `rewrite` changes them (what a modified hospital could
    send beyond `federation.faults`); `rounds` counts the train exchanges."""

    def __init__(self, app: Any, num_nodes: int, rewrite: Rewrite) -> None:
        super().__init__(app, num_nodes)
        self.rewrite, self.rounds = rewrite, 0

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.rounds += bool(messages) and messages[0].metadata.message_type == "train"
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.metadata.src_node_id == min(self.contexts) and not r.has_error():
                self.rewrite(r.metadata.message_type, r.content, self.rounds)
        return replies


def _run(tmp: Path, name: str, bundle: Path, keys: Path, *overrides: str,
         enrol: bool = True, rewrite: Rewrite | None = None) -> dict[str, Any]:
    run = tmp / name
    settings = run_settings(HEART, (*FAST, *overrides), run, bundle, keys)
    if enrol:
        cfg = load_config(HEART, [*FAST, *overrides])
        enrol_simulated(run, raw_sites(cfg.federation.data, cfg.seed)[1])
    app = make_client_app(settings)
    run_federation(InProcessGrid(app, 4) if rewrite is None else RewritingGrid(app, 4, rewrite),
                   settings)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    return {"run": run, "rows": rows, "audit": audit, "summary": summary}


def _attack(fraction: float, kind: str, value: float = 1e300) -> tuple[str, ...]:
    return (f"federation.faults.attack={kind}", f"federation.faults.attack_fraction={fraction}",
            f"federation.faults.attack_value={value}")


def _head(run: Path, version: int) -> bytes:
    return (Registry(run / "registry").version_dir(version) / "head.safetensors").read_bytes()


@pytest.fixture(scope="module")
def clean(tmp_path_factory, heart_bundle, signing_key_path) -> dict[str, Any]:
    with task_identity():
        return _run(tmp_path_factory.mktemp("clean"), "clean", heart_bundle, signing_key_path)


@pytest.mark.parametrize(("fraction", "value"), [(0.25, 1e300), (0.5, 1e308)])
def test_inflated_counts_leave_the_global_model_as_the_clean_one(
        clean, tmp_path, heart_bundle, signing_key_path, fraction, value) -> None:
    attacked = _run(tmp_path, "inflated", heart_bundle, signing_key_path,
                    *_attack(fraction, "inflate-count", value))
    accuracy = [r["validation"]["accuracy"] for r in attacked["rows"]]
    assert abs(accuracy[-1] - clean["rows"][-1]["validation"]["accuracy"]) <= 0.02
    # the weights are bounded by each site's enrolled size, so it is exactly the clean model
    assert _head(attacked["run"], 3) == _head(clean["run"], 3)


def test_without_enrolment_an_inflated_count_is_bounded_by_the_round_median(
        tmp_path, heart_bundle, signing_key_path, caplog) -> None:
    caplog.set_level("WARNING", logger="medfed.server")
    out = _run(tmp_path, "median", heart_bundle, signing_key_path,
               *_attack(0.25, "inflate-count"), enrol=False)
    assert len(out["rows"]) == 4
    assert "capped the weight of" in caplog.text and "the bound is" in caplog.text


@pytest.mark.parametrize(("kind", "reason"), [
    ("huge-update", "exceeds the bound 1000"),
    ("nan-update", "NaN or infinite"),
    ("omit-count", "reply has no 'num-examples'"),
])
def test_each_bad_update_is_excluded_with_a_reason_and_the_run_finishes(
        tmp_path, heart_bundle, signing_key_path, kind, reason) -> None:
    out = _run(tmp_path, kind, heart_bundle, signing_key_path, *_attack(0.25, kind, 3e38))
    assert [r["round"] for r in out["rows"]] == [0, 1, 2, 3]
    excluded = [e for e in out["audit"] if "excluded" in e and e["type"] == "train"]
    assert len(excluded) == 3 and all(reason in e["excluded"] for e in excluded)
    assert all(reason in next(iter(r["excluded"].values())) for r in out["rows"][1:])
    for r in out["rows"]:
        assert all(isinstance(v, float) and v == v for k, v in r["validation"].items()
                   if k in ("accuracy", "auc", "loss"))


def _replies_that_crashed_the_server(kind: str, content: RecordDict, server_round: int) -> None:
    """Round 1: a train reply without its loss; 2: an extra array record; 3: a tensor that is
    no .npy; every evaluate reply: positives beyond any float count (each raised before)."""
    if kind == "train" and server_round == 1:
        metrics = dict(content.metric_records[rk.METRICS])
        del metrics["loss"]
        content[rk.METRICS] = MetricRecord(metrics)
    elif kind == "train" and server_round == 2:
        content["junk"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    elif kind == "train":
        name, arr = next(iter(content.array_records[rk.ARRAYS].items()))
        content[rk.ARRAYS][name] = Array(arr.dtype, tuple(arr.shape), arr.stype, b"no .npy")
    elif kind == "evaluate":
        content[rk.METRICS] = MetricRecord({**content.metric_records[rk.METRICS],
                                            "val-positives": 1.7e308})


def test_replies_that_crashed_the_server_are_excluded_and_the_run_finishes(
        tmp_path, heart_bundle, signing_key_path) -> None:
    out = _run(tmp_path, "crashers", heart_bundle, signing_key_path,
               rewrite=_replies_that_crashed_the_server)
    assert [r["round"] for r in out["rows"]] == [0, 1, 2, 3]
    reasons = {(e["type"], e["excluded"]) for e in out["audit"] if "excluded" in e}
    assert reasons == {
        ("train", "reply lacks the metrics ['loss']"),
        ("train", "unexpected array records ['junk']"),
        ("train", "tensor 'head.weight' does not decode as an array (ValueError)"),
        ("evaluate", "'val-positives' is not a count of at most 'val-n' rows")}
    assert all(len(r["sites"]) == 3 for r in out["rows"])  # the honest sites' scores


def test_a_site_claiming_a_huge_validation_split_is_weighed_as_its_enrolled_size(
        tmp_path, heart_bundle, signing_key_path, caplog) -> None:
    """Scores weigh by the rows a site says it scored: 1e9 rows would make its figure the
    federation's, and pick `best`, alone."""
    def claim(kind: str, content: RecordDict, server_round: int) -> None:
        metrics = dict(content.metric_records[rk.METRICS])
        if kind == "query.backbone":
            metrics.update({"rows/validation": 999_999_999, "rows/test": 999_999_999})
        elif kind == "evaluate":
            metrics.update({"val-n": 999_999_999, rk.NUM_EXAMPLES: 999_999_999,
                            "test-n": 999_999_999})
        content[rk.METRICS] = MetricRecord(metrics)

    caplog.set_level("WARNING", logger="medfed.server")
    out = _run(tmp_path, "claim", heart_bundle, signing_key_path, rewrite=claim)
    enrolled = json.loads((out["run"] / "enrolment.json").read_text())
    first = sorted(out["rows"][-1]["sites"])[0]
    assert out["rows"][-1]["sites"][first]["validation"]["n"] == enrolled["max_examples"][first]
    assert f"capped the validation weight of {first}: it claimed 1e+09 rows" in caplog.text
    assert f"capped the test weight of {first}" in caplog.text


def test_the_manifest_names_the_enrolled_hospitals_and_their_errors_reach_the_log_printable(
        tmp_path, heart_bundle, signing_key_path, caplog) -> None:
    from flwr.app import Error

    from server.provisioning import Enrolment

    class Failing(InProcessGrid):  # the first node's save fails with a hostile reason
        def send_and_receive(self, messages: Iterable[Message], *,
                             timeout: float | None = None) -> Iterable[Message]:
            replies = list(super().send_and_receive(messages, timeout=timeout))
            for i, r in enumerate(replies):
                if (r.metadata.message_type == f"query.{rk.QUERY_SAVE_MODEL}"
                        and r.metadata.src_node_id == min(self.contexts)):
                    replies[i] = Message(Error(code=0, reason="\x1b[2J INFO all is well\n"
                                               + "x" * 5000), reply_to=r)
                    replies[i].metadata.__dict__["_src_node_id"] = r.metadata.src_node_id
            return replies

    caplog.set_level("WARNING", logger="medfed.server")
    run = tmp_path / "run"
    settings = run_settings(HEART, FAST, run, heart_bundle, signing_key_path)
    grid = Failing(make_client_app(settings), 4)
    # as `medfed server` writes them: the operator's names by node id
    Enrolment(names=dict(zip(sorted(grid.contexts), "abcd", strict=True))).write(run)
    run_federation(grid, settings)
    manifest = json.loads((Registry(run / "registry").version_dir(3) / "manifest.json")
                          .read_text())
    assert manifest["sites"] == ["a", "b", "c", "d"]
    said = [r.getMessage() for r in caplog.records if "did not save" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("a did not save the final model: ?[2J INFO")
    assert "\x1b" not in said[0] and "\n" not in said[0] and len(said[0]) < 400
    # the audit (which the console shows) keeps the same bounded, printable words
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    errors = [e["error"] for e in audit if "error" in e]
    assert len(errors) == 1 and errors[0].startswith("?[2J INFO") and len(errors[0]) <= 301


def test_the_audit_keeps_what_a_reply_carried_bounded(tmp_path, heart_bundle,
                                                      signing_key_path) -> None:
    """Recorded before the checks and shown by the console: 5 MB of words or a list of a
    million numbers went into audit.jsonl whole."""
    from flwr.app import ConfigRecord

    def stuff(kind: str, content: RecordDict, server_round: int) -> None:
        if kind == "train":
            content["junk"] = ConfigRecord({"words": "\u202e" + "A" * 100_000,
                                            "many": list(range(1000))})

    out = _run(tmp_path, "stuffed", heart_bundle, signing_key_path, rewrite=stuff)
    stuffed = [e["configs"] for e in out["audit"] if "junk/words" in e.get("configs", {})]
    assert len(stuffed) == 3  # one per round, whole runs on
    assert stuffed[0]["junk/words"].startswith("?AAA") and len(stuffed[0]["junk/words"]) <= 301
    assert stuffed[0]["junk/many"] == [*range(16), "… 1000 items"]


def test_a_spoofed_name_is_not_taken_over(tmp_path, heart_bundle, signing_key_path,
                                          caplog) -> None:
    caplog.set_level("WARNING", logger="medfed.server")
    out = _run(tmp_path, "spoof", heart_bundle, signing_key_path, *_attack(0.25, "spoof-name"))
    names = set(out["rows"][-1]["sites"])
    assert len(names) == 4  # four nodes, four distinct names
    assert any("~" in n for n in names)
    assert "two hospitals call themselves" in caplog.text


def test_a_hospital_sending_malformed_replies_is_kept_out_not_fatal(
        tmp_path, heart_bundle, signing_key_path) -> None:
    out = _run(tmp_path, "malformed", heart_bundle, signing_key_path,
               *_attack(0.25, "malformed"))
    excluded = [e for e in out["audit"] if "excluded" in e]
    assert excluded and {e["type"] for e in excluded} == {"query.backbone"}
    assert {e["excluded"] for e in excluded} == {"reply has no metrics record"}
    assert [r["round"] for r in out["rows"]] == [0, 1, 2, 3]
    assert len(out["rows"][-1]["sites"]) == 3  # the three honest sites' validation metrics


@pytest.mark.parametrize(("fill", "fragment"), [(float("nan"), "NaN or infinite"),
                                                (1e6, "moved by")])
def test_an_absurd_aggregate_is_never_published(tmp_path, heart_bundle, signing_key_path,
                                                fill, fragment) -> None:
    import torch
    from flwr.app import ArrayRecord

    from server.federation import prepare
    from server.provisioning import RunStopped

    settings = run_settings(HEART, FAST, tmp_path / "run", heart_bundle, signing_key_path)
    fed = prepare(InProcessGrid(make_client_app(settings), 4), settings)
    state = fed.model.state_dict()
    good = ArrayRecord({n: state[n].detach().clone() for n in fed.trainable})
    fed.evaluate_round(0, good)  # round 0: the pretrained model, published
    bad = ArrayRecord({n: torch.full_like(state[n], fill) for n in fed.trainable})
    with pytest.raises(RunStopped, match=fragment):
        fed.evaluate_round(1, bad)
    assert fed.registry.versions() == [0]


def test_a_hospital_whose_csv_lacks_a_column_leaves_and_the_run_goes_on(
        tmp_path, heart_bundle, signing_key_path, signing_pub_path, caplog) -> None:
    from server.provisioning import Enrolment
    from tests.conftest import heart_csv_without

    csv = heart_csv_without("va", "chol", tmp_path / "va.csv")
    caplog.set_level("WARNING", logger="medfed.server")
    run = tmp_path / "run"
    settings = run_settings(HEART, FAST, run, heart_bundle, signing_key_path)
    grid = InProcessGrid(make_client_app(settings), 4)
    va = max(grid.contexts)
    grid.contexts[va].node_config.clear()
    grid.contexts[va].node_config.update({
        "site-name": "va", "data-path": str(csv), "workdir": str(tmp_path / "va-work"),
        "signing-pub": str(signing_pub_path)})
    # as `medfed server` does: the operator's names by node id (the refusal carries none)
    names = ("cleveland", "hungary", "switzerland", "va")
    Enrolment(names=dict(zip(sorted(grid.contexts), names, strict=True))).write(run)
    run_federation(grid, settings)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[-1]["sites"]) == {"cleveland", "hungary", "switzerland"}
    said = [r.getMessage() for r in caplog.records if " left: " in r.getMessage()]
    assert said == ["va left: its data does not match the model's schema "
                    "(its data file: missing column(s) 'chol')"]
    assert str(tmp_path) not in caplog.text  # the server never sees the hospital's path
    # once it left, nothing more is sent to it
    sent_to_va = [m.metadata.message_type for m in grid.received
                  if m.metadata.src_node_id == va]
    assert sent_to_va == ["query.backbone"] * len(sent_to_va) and len(sent_to_va) <= 2


def test_a_reply_with_its_tensors_reordered_is_still_clipped_under_dp(
        tmp_path, heart_bundle, signing_key_path) -> None:
    """Flower's server-side clipping pairs a reply's tensors with the global ones by
    position while FedAvg averages by name: reversed, an update escaped the clipping (or,
    with other shapes, raised and ended the run)."""
    def reverse(kind: str, content: RecordDict, server_round: int) -> None:
        if kind == "train":
            arrays = content.array_records[rk.ARRAYS]
            content[rk.ARRAYS] = ArrayRecord({k: arrays[k] for k in reversed(list(arrays))})

    clip = 0.01
    out = _run(tmp_path, "reversed", heart_bundle, signing_key_path,
               "federation.privacy.dp=server", f"federation.privacy.clipping_norm={clip}",
               "federation.privacy.noise_multiplier=0", rewrite=reverse)
    assert [r["round"] for r in out["rows"]] == [0, 1, 2, 3]
    from safetensors.numpy import load_file

    heads = [load_file(Registry(out["run"] / "registry").version_dir(v) / "head.safetensors")
             for v in (0, 1)]
    moved = np.sqrt(sum(float(((heads[1][k] - heads[0][k]) ** 2).sum()) for k in heads[0]))
    assert moved <= clip * (1 + 1e-4)  # the mean of updates each clipped to `clip`


def _lie_for(target: int) -> Rewrite:
    """Every evaluate reply scores version `target` perfect and every other one worthless."""
    def lie(kind: str, content: RecordDict, server_round: int) -> None:
        if kind == "evaluate":
            metrics = dict(content.metric_records[rk.METRICS])
            metrics["val-auc"] = 1.0 if server_round == target else 0.0
            content[rk.METRICS] = MetricRecord(metrics)
    return lie


def _aucs(row: dict[str, Any], liar: str) -> tuple[float, list[float]]:
    """A round's published validation AUC and the honest sites' own (where defined)."""
    honest = [v["validation"]["auc"] for s, v in row["sites"].items() if s != liar]
    return row["validation"]["auc"], [a for a in honest if a is not None]


def test_a_site_lying_about_its_scores_picks_best_only_under_the_mean(
        tmp_path, heart_bundle, signing_key_path) -> None:
    """One hospital scores version 1 perfect and every other version worthless. Under the
    mean over sites its word picks `best`; under the median the published figure of every
    version stays within what the honest sites measured; under an operator's own file no
    site's word counts at all."""
    from tests.test_heldout import _labelled_file

    target, best = 1, lambda run: json.loads((run / "registry" / "best.json").read_text())
    honest = _run(tmp_path, "honest", heart_bundle, signing_key_path)
    assert best(honest["run"])["version"] != target  # the lie has something to change
    mean = _run(tmp_path, "mean", heart_bundle, signing_key_path, rewrite=_lie_for(target))
    assert best(mean["run"])["version"] == target
    liar = next(s for s, v in mean["rows"][target]["sites"].items()
                if v["validation"]["auc"] == 1.0)
    published, others = _aucs(mean["rows"][0], liar)
    assert published < min(others)  # pulled outside what every honest site measured

    median = _run(tmp_path, "median", heart_bundle, signing_key_path,
                  "federation.heldout=validation-median", rewrite=_lie_for(target))
    for row in median["rows"]:
        published, others = _aucs(row, liar)
        assert min(others) <= published <= max(others), row["round"]
    assert "median over sites" in best(median["run"])["source"]

    path = tmp_path / "operator.csv"
    _labelled_file(path)
    own = [_run(tmp_path, name, heart_bundle, signing_key_path, f"federation.heldout=file:{path}",
                rewrite=lie) for name, lie in (("file-honest", None),
                                               ("file-lied-to", _lie_for(target)))]
    assert best(own[0]["run"]) == best(own[1]["run"])
    assert [r["validation"] for r in own[0]["rows"]] == [r["validation"] for r in own[1]["rows"]]
