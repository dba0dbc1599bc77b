"""Benchmark 7: what the server's reply checks cost, against the round they protect.

One heart round's replies, built as the server receives them (4 hospitals: provisioning,
train with the 16->2 head, evaluate with validation and test metrics), go through exactly
what `server/provisioning.py` does with them: every check of `server/validation.py`, the
weight bound, the checked copies the strategy sees, and the aggregate's finiteness check.
The time is the median of repeated passes (alternated with an empty pass to subtract the
loop), compared with the median round time of the real heart simulations that
benchmarks/heart.py ran (their metrics.jsonl), so the ratio is measured, not estimated.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from benchmarks.util import WORK, fmt, md_table
from common import records as rk
from server.provisioning import _with_metrics
from server.validation import (
    check_evaluate_reply,
    check_provision_reply,
    validate_train_replies,
)

HOSPITALS = 4
REPEATS = 200
SENT = {"head.weight": np.zeros((2, 16), np.float32), "head.bias": np.zeros(2, np.float32)}


def _replies() -> tuple[list[Message], list[Message], list[Message]]:
    from tests.flower_helpers import task_identity  # noqa: PLC0415 (Message needs an identity)

    rng = np.random.default_rng(0)
    metric_keys = ["accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity",
                   "ppv", "npv", "f1", "brier", "ece", "loss", "n", "positives"]
    out: tuple[list[Message], list[Message], list[Message]] = ([], [], [])
    for node in range(1, HOSPITALS + 1):
        with task_identity(node_id=0):
            ask = Message(RecordDict({}), dst_node_id=node, message_type="train")
        with task_identity(node_id=node):
            out[0].append(Message(RecordDict({rk.METRICS: MetricRecord(
                {rk.HAS_BACKBONE: 1, rk.NUM_TRAIN: 100, "rows/train": 100,
                 "rows/validation": 25, "rows/test": 60})}), reply_to=ask))
            out[1].append(Message(RecordDict({
                rk.ARRAYS: ArrayRecord({k: Array((v + 0.1 * rng.standard_normal(v.shape))
                                                 .astype(np.float32)) for k, v in SENT.items()}),
                rk.METRICS: MetricRecord({rk.NUM_EXAMPLES: 100, "loss": 0.5, "steps": 20}),
                rk.SITE: ConfigRecord({rk.SITE_NAME: f"site-{node}"})}), reply_to=ask))
            metrics = {f"{p}-{k}": float(rng.random()) for p in ("val", "test")
                       for k in metric_keys}
            metrics.update({"val-n": 25, "test-n": 60, rk.NUM_EXAMPLES: 25})
            out[2].append(Message(RecordDict({rk.METRICS: MetricRecord(metrics)}),
                                  reply_to=ask))
    return out


def _one_round(provision: list[Message], train: list[Message], evaluate: list[Message]) -> None:
    for r in provision:
        check_provision_reply(r)
    declared = {r.metadata.src_node_id: 100.0 for r in train}
    verdicts = validate_train_replies(SENT, train, declared, 10.0, 1000.0,
                                      dict.fromkeys(declared, 100), 0, 3.0)
    for r, v in zip(train, verdicts, strict=True):
        _with_metrics(r, {rk.NUM_EXAMPLES: float(v.weight or 0), "loss": 0.5, "steps": 20})
    sizes = {"train": 100, "validation": 25, "test": 60}
    for r in evaluate:
        check_evaluate_reply(r, sizes)
        _with_metrics(r, {rk.NUM_EXAMPLES: 25.0})
    aggregate = {k: v.copy() for k, v in SENT.items()}
    assert all(np.isfinite(v).all() for v in aggregate.values())


def _round_times() -> list[float]:
    """Seconds per round of the real heart simulations (rounds 2+, as metrics.jsonl has them)."""
    times = []
    for path in sorted((WORK / "heart-sim").glob("seed*/metrics.jsonl")):
        elapsed = [json.loads(line)["elapsed_s"] for line in path.read_text().splitlines()]
        times += [b - a for a, b in zip(elapsed[1:], elapsed[2:], strict=False)]
    return times


def run(quick: bool) -> dict[str, Any]:
    """Median cost of one round's checks vs the median heart round."""
    provision, train, evaluate = _replies()
    repeats = 20 if quick else REPEATS
    checks, empty = [], []
    for _ in range(repeats):  # alternate the measured pass and an empty one
        t0 = time.perf_counter()
        _one_round(provision, train, evaluate)
        checks.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _one_round([], [], [])
        empty.append(time.perf_counter() - t0)
    cost = max(statistics.median(checks) - statistics.median(empty), 0.0)
    rounds = _round_times()
    round_s = statistics.median(rounds) if rounds else None
    share = cost / round_s if round_s else None
    return {"hospitals": HOSPITALS, "repeats": repeats, "check_s": cost,
            "check_s_spread": [min(checks), max(checks)], "round_s": round_s,
            "rounds_measured": len(rounds),
            "headline": {"defence_cost_share_of_round": share}}


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    return md_table(
        ["hospitals", "checks per round (median of passes)", "heart round (median, real "
         "simulation)", "share"],
        [[str(res["hospitals"]), f"{res['check_s'] * 1e3:.2f} ms",
          "not measured" if res["round_s"] is None else f"{res['round_s']:.2f} s "
          f"({res['rounds_measured']} rounds)",
          "—" if res["headline"]["defence_cost_share_of_round"] is None
          else fmt(100 * res["headline"]["defence_cost_share_of_round"], 3) + " %"]])
