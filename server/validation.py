"""Checks on every training reply before it reaches the strategy.

A reply must carry exactly the trainable tensors that were sent (same names, shapes, float
dtype), finite values, a positive `num-examples` no larger than what the site declared, and an
update whose norm is within `max_norm_ratio` times the round's median update norm. Invalid
replies are excluded with a reason naming the site, never a data value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from common import records as rk
from common.data.splits import TEST_LABEL


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one reply."""

    node_id: int
    reason: str | None  # None: valid

    @property
    def valid(self) -> bool:
        """True when the reply may be aggregated."""
        return self.reason is None


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    record = msg.content.array_records.get(rk.ARRAYS)
    if record is None:
        return {}
    return {name: arr.numpy() for name, arr in record.items()}


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
        if not np.issubdtype(arr.dtype, np.floating):
            return f"tensor '{name}' has dtype {arr.dtype}, expected a float dtype"
        if not np.isfinite(arr).all():
            return f"tensor '{name}' holds NaN or infinite values"
    return None


def check_count(msg: Message, declared: int | None) -> str | None:
    """`num-examples` present, positive, and not above the site's declared train size."""
    metrics = msg.content.metric_records.get(rk.METRICS)
    if metrics is None or rk.NUM_EXAMPLES not in metrics:
        return "reply has no 'num-examples'"
    n = metrics[rk.NUM_EXAMPLES]
    if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(float(n)):
        return "'num-examples' is not a number"
    if n <= 0:
        return f"'num-examples' is {n}, expected > 0"
    if declared is not None and n > declared:
        return f"'num-examples' is {int(n)}, above the {declared} training rows the site declared"
    return None


def update_norm(sent: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (reply - global) over all trainable tensors."""
    total = 0.0
    for name, ref in sent.items():
        diff = got[name].astype(np.float64) - ref.astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def validate_train_replies(
    sent: Mapping[str, np.ndarray],
    replies: list[Message],
    declared: Mapping[int, int],
    max_norm_ratio: float,
) -> list[Verdict]:
    """One verdict per non-error reply, in order."""
    verdicts: dict[int, str | None] = {}
    norms: dict[int, float] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        got = _arrays(msg)
        reason = check_shapes(sent, got) or check_count(msg, declared.get(node))
        verdicts[node] = reason
        if reason is None:
            norms[node] = update_norm(sent, got)
    if max_norm_ratio > 0 and len(norms) >= 3:
        # with fewer than three updates a median says nothing about an outlier
        median = float(np.median(list(norms.values())))
        bound = max_norm_ratio * max(median, 1e-12)
        for node, norm in norms.items():
            if norm > bound:
                verdicts[node] = (f"update norm {norm:.3g} exceeds {max_norm_ratio:g} x the "
                                  f"round median {median:.3g}")
    return [Verdict(msg.metadata.src_node_id, verdicts[msg.metadata.src_node_id])
            for msg in replies]


SITE_MODEL_FILES = ("backbone.safetensors", "head.safetensors", "site_stats.json")
_HEX64 = frozenset("0123456789abcdef")


def _finite_or_nan(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and (
        math.isfinite(float(value)) or math.isnan(float(value)))


def check_site_model_reply(msg: Message) -> str | None:
    """A site-model reply: its numbers, words and file hashes; None when fine."""
    metrics = msg.content.metric_records.get(rk.METRICS)
    words = msg.content.config_records.get(rk.SITE_MODEL)
    if metrics is None or words is None:
        return "reply lacks its metrics or site-model record"
    for key in (rk.SITE_KEPT_ADAPTED, "steps", "temperature", "threshold"):
        if key not in metrics or not _finite_or_nan(metrics[key]):
            return f"'{key}' is missing or not a number"
    if not all(_finite_or_nan(v) for v in metrics.values()):
        return "a metric is not a number"
    t, thr = float(metrics["temperature"]), float(metrics["threshold"])  # type: ignore[arg-type]
    if not (0.05 <= t <= 20.0 and 0.0 <= thr <= 1.0):
        return f"temperature {t:.3g} or threshold {thr:.3g} out of range"
    for name in SITE_MODEL_FILES:
        digest = words.get(f"sha256/{name}")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64:
            return f"hash of {name} is missing or not 64 hex characters"
    for key in ("method", "reason", "rule"):
        if not isinstance(words.get(key), str) or len(str(words.get(key))) > 2000:
            return f"'{key}' is missing or longer than 2000 characters"
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
    site = {
        "kept": "adapted" if int(metrics[rk.SITE_KEPT_ADAPTED]) else "global",  # type: ignore[call-overload]
        "method": str(words["method"]), "reason": str(words["reason"]),
        "steps": int(metrics["steps"]),  # type: ignore[call-overload]
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
