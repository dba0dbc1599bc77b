"""Benchmark 6b: a medfed deployment round against a plain Flower app's, side by side.

Both on 127.0.0.1, insecure, 2 hospitals / SuperNodes, 4 rounds, alternated (medfed, Flower,
Flower, medfed), 2 runs each. medfed: `medfed server` + 2 `medfed client` on the heart
CSVs (benchmarks/deployment.py); Flower: benchmarks/flower_baseline.py. Per side, the figure
is the median over runs of the mean of rounds 2+ (round 1 carries provisioning and process
starts); the ratio is medfed / Flower. Where medfed's time goes: each message phase (one
batch of messages to the hospitals and their replies) ends when the replies are written to
the run's audit.jsonl; a phase's time is from the end of the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from benchmarks.deployment import deploy_run
from benchmarks.flower_baseline import run_baseline
from benchmarks.util import WORK, md_table

ROUNDS = 4
RUNS_FULL, RUNS_QUICK = 2, 1


def message_phases(audit: Path) -> list[dict[str, Any]]:
    """The run's message phases in order: kind, federation round (None outside the rounds),
    end time since the first phase ended, and seconds since the previous phase ended."""
    batches: list[dict[str, Any]] = []
    for line in audit.read_text(encoding="utf-8").splitlines():
        e = json.loads(line)
        last = batches[-1] if batches else None
        if last and last["kind"] == e["type"] and e["time"] - last["end"] < 1.0:
            last["end"] = e["time"]
        else:
            batches.append({"kind": e["type"], "round": e.get("round"), "end": e["time"]})
    t0 = batches[0]["end"] if batches else 0.0
    out, prev = [], None
    for b in batches:
        out.append({"kind": b["kind"], "round": b["round"], "at_s": round(b["end"] - t0, 2),
                    "seconds": None if prev is None else round(b["end"] - prev, 2)})
        prev = b["end"]
    return out


def phase_summary(phases: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per kind of phase (the first phase has no start and is left out)."""
    kinds: dict[str, list[float]] = {}
    for p in phases:
        if p["seconds"] is not None:
            kinds.setdefault(p["kind"], []).append(p["seconds"])
    return {k: round(statistics.median(v), 2) for k, v in kinds.items()}


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
            row = {"side": side, "run": i, "load_1min_at_start": load,
                   "round_s": res["round_s"], "per_round_s": res["per_round_s"]}
            if side == "medfed":
                row["phases"] = message_phases(root / "server-run" / "audit.jsonl")
            rows.append(row)
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
    parts = [
        md_table(["side", "run", "mean of rounds 2+", "all rounds (s)", "1-min load at start"],
                 table),
        f"Median per round (2+): medfed {res['medfed_per_round_s']:.1f} s, plain Flower "
        f"{res['flower_per_round_s']:.1f} s; ratio "
        f"{res['headline']['deploy_round_ratio_vs_flower']:.2f}.",
    ]
    phased = [r for r in res["rows"] if r.get("phases")]
    if phased:
        kinds = sorted({k for r in phased for k in phase_summary(r["phases"])})
        rows = [[f"medfed run {r['run'] + 1}", *(f"{phase_summary(r['phases']).get(k, 0):.1f} s"
                                                 for k in kinds)] for r in phased]
        parts += [
            "Where a medfed run's time goes, per message phase (median seconds from the end of "
            "the previous phase to the last reply of this one, from audit.jsonl; `query.*` "
            "phases are outside the rounds: backbone check and send, final model, site model "
            "build and save):",
            md_table(["run", *kinds], rows),
            "A round is one train and one evaluate phase; each costs about what one phase of "
            "the plain Flower app costs (its round, train + federated evaluate, is two phases "
            "too): Flower's polling (SuperNode 3 s, ServerApp 3 s) and the fresh ClientApp "
            "process per message set the floor, and medfed's checks, signing and checkpoint "
            "fit inside it.",
        ]
    return "\n\n".join(parts)
