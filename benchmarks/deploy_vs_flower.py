"""Benchmark 6b: a medfed deployment round against a plain Flower app's, side by side.

Both on 127.0.0.1, insecure, 2 hospitals / SuperNodes, 4 rounds, alternated (medfed, Flower,
Flower, medfed), 2 runs each. medfed: `medfed server` + 2 `medfed client` on the heart
CSVs (benchmarks/deployment.py); Flower: benchmarks/flower_baseline.py. Per side, the figure
is the median over runs of the mean of rounds 2+ (round 1 carries provisioning and process
starts); the ratio is medfed / Flower.
"""

from __future__ import annotations

import os
import shutil
import statistics
from typing import Any

from benchmarks.deployment import deploy_run
from benchmarks.flower_baseline import run_baseline
from benchmarks.util import WORK, md_table

ROUNDS = 4
RUNS_FULL, RUNS_QUICK = 2, 1


def run(quick: bool) -> dict[str, Any]:
    """Alternated runs of both sides."""
    runs = RUNS_QUICK if quick else RUNS_FULL
    base = WORK / "deploy_vs_flower"
    rows: list[dict[str, Any]] = []
    for i in range(runs):
        order = ("medfed", "flower") if i % 2 == 0 else ("flower", "medfed")
        for side in order:
            root = base / f"{i}-{side}"
            if root.exists():
                shutil.rmtree(root)
            load = round(os.getloadavg()[0], 2)
            res = (deploy_run(2, False, root, ROUNDS) if side == "medfed"
                   else run_baseline(root, ROUNDS))
            rows.append({"side": side, "run": i, "load_1min_at_start": load,
                         "round_s": res["round_s"], "per_round_s": res["per_round_s"]})
            print(f"  {side} run {i + 1}: {res['per_round_s']:.1f} s per round (2+)", flush=True)

    def median(side: str) -> float:
        return statistics.median(r["per_round_s"] for r in rows if r["side"] == side)

    medfed, flower = median("medfed"), median("flower")
    return {"rows": rows, "rounds": ROUNDS, "medfed_per_round_s": medfed,
            "flower_per_round_s": flower,
            "headline": {"deploy_round_ratio_vs_flower": medfed / flower}}


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    table = [[r["side"], str(r["run"] + 1), f"{r['per_round_s']:.1f} s",
              ", ".join(f"{t:.1f}" for t in r["round_s"]), str(r["load_1min_at_start"])]
             for r in res["rows"]]
    return "\n\n".join([
        md_table(["side", "run", "mean of rounds 2+", "all rounds (s)", "1-min load at start"],
                 table),
        f"Median per round (2+): medfed {res['medfed_per_round_s']:.1f} s, plain Flower "
        f"{res['flower_per_round_s']:.1f} s; ratio "
        f"{res['headline']['deploy_round_ratio_vs_flower']:.2f}.",
    ])
