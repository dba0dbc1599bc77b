"""Checks on every reply a hospital sends, before anything of it is used.

A hospital is untrusted input. Every reply type goes through one of the checks below; a reply
that fails is excluded with a reason naming the site, never a data value, and nothing in a
reply can raise inside the server:

- provisioning (`query.backbone`): a 0/1 `has-backbone`; sizes that are counts;
- train: exactly the trainable tensors that were sent (names, shapes, float32 or float64), finite
  values, an update whose norm is within `max_norm_ratio` x the round median and within the
  absolute `max_update_norm`, a positive `num-examples` no larger than the site declared;
  its aggregation weight is then capped by a bound the server sets (:func:`weight_bound`);
- evaluate (and the scores a train reply carries with `evaluate_with_train`): known metric
  names only, each within its range (NaN allowed: an undefined metric), counts within what
  the site declared and positives within the rows;
- site model (`query.adapt`): numbers, metrics within their ranges, a 0/1 choice, counts of
  steps and rows, words of bounded length, 64-hex file hashes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MetricRecord

from common import records as rk
from common.bundle import BACKBONE_FILE, HEAD_FILE, SITE_STATS_FILE
from common.data.splits import TEST_LABEL
from common.metrics import COUNT_KEYS, METRIC_NAMES, MULTICLASS_METRIC_NAMES
from common.scoring import INTERVAL_METRICS

MAX_COUNT = 1e9  # rows a hospital may claim in any split: above is not a real cohort
UPDATE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what a trained tensor may be
MAX_WORDS = 2000  # characters of any word a site sends (a method, a reason, a note)
# what a site may report of a split (common/metrics.py, common/scoring.py), with its range:
# a value outside cannot come from the metric, and one such value would move the mean over
# sites, and with it the version called `best`, as far as the site likes
METRIC_RANGES: dict[str, tuple[float, float]] = {
    **{name: (0.0, 1.0) for name in (*METRIC_NAMES, *MULTICLASS_METRIC_NAMES)
       if name not in COUNT_KEYS},
    "brier": (0.0, 2.0),  # multiclass Brier
    "loss": (0.0, math.inf),
    # a site model's bootstrap bounds (common/scoring.py::score_with_intervals)
    **{f"{name}_{end}": (0.0, 1.0) for name in INTERVAL_METRICS for end in ("lo", "hi")},
}


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one reply; `weight`: its aggregation weight when valid."""

    node_id: int
    reason: str | None  # None: valid
    weight: float | None = None

    @property
    def valid(self) -> bool:
        """True when the reply may be aggregated."""
        return self.reason is None


def is_number(value: object) -> bool:
    """An int or float (not a bool); NaN counts (an undefined metric), infinity does not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(float(value)) or math.isnan(float(value))


def is_count(value: object) -> bool:
    """A finite, non-negative, integral number of rows below :data:`MAX_COUNT`."""
    return (is_number(value) and not math.isnan(float(value))  # type: ignore[arg-type]
            and 0 <= float(value) < MAX_COUNT and float(value).is_integer())  # type: ignore[arg-type]


def _metrics(msg: Message) -> MetricRecord | None:
    record = msg.content.metric_records.get(rk.METRICS)
    return record if isinstance(record, MetricRecord) else None


class Undecodable(ValueError):
    """A reply's tensor that does not decode as an array."""


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    record = msg.content.array_records.get(rk.ARRAYS)
    if record is None:
        return {}
    out = {}
    for name, arr in record.items():
        try:
            out[name] = arr.numpy()
        except Exception as err:  # noqa: BLE001 - any decoding failure is the sender's
            raise Undecodable(f"tensor '{name}' does not decode as an array "
                              f"({type(err).__name__})") from None
    return out


def check_records(msg: Message) -> str | None:
    """Exactly one array record, the update: the strategy aggregates every record it gets."""
    extra = sorted(set(msg.content.array_records) - {rk.ARRAYS})
    return f"unexpected array records {extra}" if extra else None


# ------------------------------------------------------------------- provisioning replies


def check_provision_reply(msg: Message) -> str | None:
    """`has-backbone` 0 or 1; every value a finite number.

    A large `num-train` is not refused here: the weight it would give is bounded later
    (:func:`weight_bound`); its split sizes are only logged.
    """
    metrics = _metrics(msg)
    if metrics is None:
        return "reply has no metrics record"
    if metrics.get(rk.HAS_BACKBONE) not in (0, 1):
        return f"'{rk.HAS_BACKBONE}' is not 0 or 1"
    for key, value in metrics.items():
        if not is_number(value) or math.isnan(float(value)):  # type: ignore[arg-type]
            return f"'{key}' is not a finite number"
    return None


# ------------------------------------------------------------------------ train replies


def check_shapes(sent: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> str | None:
    """Names, shapes, dtypes and finiteness; None when fine."""
    if set(got) != set(sent):
        extra = sorted(set(got) - set(sent))
        missing = sorted(set(sent) - set(got))
        return f"tensor names differ from the trainable set (unexpected {extra}, missing {missing})"
    for name, ref in sent.items():
        arr = got[name]
        if arr.shape != ref.shape:
            return f"tensor '{name}' has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype not in UPDATE_DTYPES:
            # Flower averages in the first reply's dtype: float16 from one site would round
            # every site's update (and the global model) to half precision
            return f"tensor '{name}' has dtype {arr.dtype}, expected float32 or float64"
        if not np.isfinite(arr).all():
            return f"tensor '{name}' holds NaN or infinite values"
    return None


def check_count(msg: Message, declared: float | None,
                required: tuple[str, ...] = ()) -> str | None:
    """`num-examples` present, positive, and not above the site's declared train size; the
    `required` metrics present (the strategy needs the same keys from every reply)."""
    metrics = _metrics(msg)
    if metrics is None or rk.NUM_EXAMPLES not in metrics:
        return "reply has no 'num-examples'"
    missing = [key for key in required if key not in metrics]
    if missing:
        return f"reply lacks the metrics {missing}"
    n = metrics[rk.NUM_EXAMPLES]
    if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(float(n)):
        return "'num-examples' is not a number"
    if n <= 0:
        return f"'num-examples' is {n}, expected > 0"
    if declared is None:
        return "the site declared no usable training size when it joined"
    if n > declared:
        return (f"'num-examples' is {n:.3g}, above the {declared:.6g} training rows the site "
                "declared")
    for key, value in metrics.items():
        if not is_number(value):
            return f"metric '{key}' is not a number"
    return None


def update_norm(sent: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (reply - global) over all trainable tensors."""
    total = 0.0
    for name, ref in sent.items():
        diff = got[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def weight_bound(claimed: Mapping[int, float], enrolled: Mapping[int, int | None],
                 cap: int, ratio: float) -> dict[int, float]:
    """The largest weight the server lets each reply carry.

    The hospital's enrolled size when the operator (or, in simulation, the data) gives one;
    else `cap` when set; else `ratio` x the median of this round's claims (weak against a
    majority of liars; documented in docs/reliability.md).
    """
    median = statistics.median(claimed.values()) if claimed else 0.0
    out = {}
    for node, n in claimed.items():
        known = enrolled.get(node)
        if known is not None:
            out[node] = float(known)
        elif cap > 0:
            out[node] = float(cap)
        elif ratio > 0:
            out[node] = ratio * median
        else:
            out[node] = n
    return out


def validate_train_replies(
    sent: Mapping[str, np.ndarray],
    replies: list[Message],
    declared: Mapping[int, float],
    max_norm_ratio: float,
    max_update_norm: float = 0.0,
    enrolled: Mapping[int, int | None] | None = None,
    max_examples: int = 0,
    max_examples_ratio: float = 0.0,
    required: tuple[str, ...] = (),
) -> list[Verdict]:
    """One verdict per non-error reply, in order; valid ones carry their bounded weight.

    `required`: metrics every train reply must carry (see :func:`check_count`).
    """
    verdicts: dict[int, str | None] = {}
    norms: dict[int, float] = {}
    claimed: dict[int, float] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        try:
            got = _arrays(msg)
        except Undecodable as err:
            verdicts[node] = str(err)
            continue
        reason = (check_records(msg) or check_shapes(sent, got)
                  or check_count(msg, declared.get(node), required))
        if reason is None:
            norms[node] = update_norm(sent, got)
            if max_update_norm > 0 and norms[node] > max_update_norm:
                reason = f"update norm {norms[node]:.3g} exceeds the bound {max_update_norm:g}"
            else:
                claimed[node] = float(msg.content.metric_records[rk.METRICS][rk.NUM_EXAMPLES])  # type: ignore[arg-type]
        verdicts[node] = reason
    valid_norms = {n: v for n, v in norms.items() if verdicts[n] is None}
    if max_norm_ratio > 0 and len(valid_norms) >= 3:
        # with fewer than three updates a median says nothing about an outlier
        median = float(np.median(list(valid_norms.values())))
        bound = max_norm_ratio * max(median, 1e-12)
        for node, norm in valid_norms.items():
            if norm > bound:
                verdicts[node] = (f"update norm {norm:.3g} exceeds {max_norm_ratio:g} x the "
                                  f"round median {median:.3g}")
                claimed.pop(node, None)
    bounds = weight_bound(claimed, enrolled or {}, max_examples, max_examples_ratio)
    return [Verdict(msg.metadata.src_node_id, verdicts[msg.metadata.src_node_id],
                    min(claimed[msg.metadata.src_node_id], bounds[msg.metadata.src_node_id])
                    if msg.metadata.src_node_id in claimed else None)
            for msg in replies]


# --------------------------------------------------------------------- evaluate replies


def check_evaluate_reply(msg: Message, sizes: Mapping[str, int] | None) -> str | None:
    """Known scores within their ranges; `val-n` / `test-n` counts no larger than the site
    declared."""
    metrics = _metrics(msg)
    if metrics is None or rk.NUM_EXAMPLES not in metrics:
        return "reply has no metrics or no 'num-examples'"
    for key, value in metrics.items():
        if not is_number(value):
            return f"metric '{key}' is not a number"
    return check_score_counts(metrics, sizes, ((rk.NUM_EXAMPLES, "validation"),),
                              scores_only=True)


SCORE_COUNTS = (("val-n", "validation"), ("test-n", "test"))
SCORE_PREFIXES = ("val-", "test-")  # the scores of a global model in a reply


def check_metric(key: str, name: str, value: object) -> str | None:
    """`value` of metric `name` (reported as `key`) is a number within the metric's range."""
    if name not in METRIC_RANGES:
        return f"unknown metric '{key}'"
    if not is_number(value):
        return f"metric '{key}' is not a number"
    lo, hi = METRIC_RANGES[name]
    v = float(value)  # type: ignore[arg-type]
    if not math.isnan(v) and not lo <= v <= hi:
        return f"metric '{key}' is {v:.4g}, outside its range [{lo:g}, {hi:g}]"
    return None


def check_score_counts(metrics: Mapping[str, object], sizes: Mapping[str, int] | None,
                       extra: tuple[tuple[str, str], ...] = (),
                       scores_only: bool = False) -> str | None:
    """The scores of the global model a site sends (an evaluate reply, or a train reply with
    `evaluate_with_train`): `val-<metric>` / `test-<metric>` within the metric's range,
    `-n` counts no larger than the site declared (and `extra` keys), `-positives` counts no
    larger than `-n`. `scores_only`: every other key is refused too."""
    for key, split in (*extra, *SCORE_COUNTS):
        if key in metrics and not is_count(metrics[key]):
            return f"'{key}' is not a count of rows"
        if key in metrics and sizes is not None and float(metrics[key]) > sizes.get(split, 0):  # type: ignore[arg-type]
            return f"'{key}' is above the {sizes.get(split, 0)} {split} rows the site declared"
    for prefix in SCORE_PREFIXES:  # a count summed over sites: bounded by the rows
        positives = metrics.get(f"{prefix}positives")
        if positives is not None and (not is_count(positives) or float(positives)  # type: ignore[arg-type]
                                      > float(metrics.get(f"{prefix}n", 0))):  # type: ignore[arg-type]
            return f"'{prefix}positives' is not a count of at most '{prefix}n' rows"
    for key, value in metrics.items():
        score_of = next((p for p in SCORE_PREFIXES if key.startswith(p)), None)
        if score_of is None:
            if scores_only and key not in (name for name, _ in extra):
                return f"unexpected metric '{key}'"
            continue
        name = key[len(score_of):]
        if name not in COUNT_KEYS and (problem := check_metric(key, name, value)):
            return problem
    return None


# --------------------------------------------------------------------- site-model replies


SITE_MODEL_FILES = (BACKBONE_FILE, HEAD_FILE, SITE_STATS_FILE)
_HEX64 = frozenset("0123456789abcdef")


def check_site_model_reply(msg: Message) -> str | None:
    """A site-model reply: its numbers, words and file hashes; None when fine."""
    metrics = _metrics(msg)
    words = msg.content.config_records.get(rk.SITE_MODEL)
    if metrics is None or words is None:
        return "reply lacks its metrics or site-model record"
    for key in (rk.SITE_KEPT_ADAPTED, "steps", "temperature", "threshold"):
        if key not in metrics or not is_number(metrics[key]):
            return f"'{key}' is missing or not a number"
    if not all(is_number(v) for v in metrics.values()):
        return "a metric is not a number"
    for key, value in metrics.items():
        who, _, name = key.rpartition("/")
        if who.endswith(("/validation", "/test")) and name not in COUNT_KEYS \
                and (problem := check_metric(key, name, value)):
            return problem
    if metrics[rk.SITE_KEPT_ADAPTED] not in (0, 1):
        return f"'{rk.SITE_KEPT_ADAPTED}' is not 0 or 1"
    for key in ("steps", *(k for k in metrics if k.startswith("rows/"))):
        if not is_count(metrics[key]):
            return f"'{key}' is not a count of rows or steps"
    t, thr = float(metrics["temperature"]), float(metrics["threshold"])  # type: ignore[arg-type]
    if not (0.05 <= t <= 20.0 and 0.0 <= thr <= 1.0):
        return f"temperature {t:.3g} or threshold {thr:.3g} out of range"
    for name in SITE_MODEL_FILES:
        digest = words.get(f"sha256/{name}")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64:
            return f"hash of {name} is missing or not 64 hex characters"
    for key in ("method", "reason", "rule"):
        if not isinstance(words.get(key), str) or len(str(words.get(key))) > MAX_WORDS:
            return f"'{key}' is missing or longer than {MAX_WORDS} characters"
    for key in ("notes", "fitted-on"):
        if key in words and (not isinstance(words[key], str)
                             or len(str(words[key])) > 4 * MAX_WORDS):
            return f"'{key}' is not text of at most {4 * MAX_WORDS} characters"
    return None


def _nested(metrics: Mapping[str, object], prefix: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            v = float(value)  # type: ignore[arg-type]
            out[key[len(prefix):]] = None if math.isnan(v) else v
    return out


def site_model_from_reply(msg: Message) -> tuple[dict[str, object], dict[str, str]]:
    """(what the site chose and measured, sha256 per file) from a checked reply."""
    metrics = msg.content.metric_records[rk.METRICS]
    words = msg.content.config_records[rk.SITE_MODEL]
    notes = [n for n in str(words.get("notes", "")).split("\n") if n]
    site: dict[str, object] = {
        "kept": "adapted" if float(metrics[rk.SITE_KEPT_ADAPTED]) else "global",  # type: ignore[arg-type]
        "method": str(words["method"]), "reason": str(words["reason"]),
        "steps": int(float(metrics["steps"])),  # type: ignore[arg-type]
        "operating_point": {"temperature": float(metrics["temperature"]),  # type: ignore[arg-type]
                            "threshold": float(metrics["threshold"]),  # type: ignore[arg-type]
                            "rule": str(words["rule"]),
                            "fitted_on": str(words.get("fitted-on", "")) or None,
                            "notes": notes},
        "rows": {k: int(v) for k, v in _nested(metrics, "rows/").items() if v is not None},
    }
    for who in ("site_model", "global"):
        site[who] = {"validation": _nested(metrics, f"{who}/validation/"),
                     "test": {**_nested(metrics, f"{who}/test/"), "label": TEST_LABEL}}
    files = {name: str(words[f"sha256/{name}"]) for name in SITE_MODEL_FILES}
    return site, files
