"""Benchmark 3b: the most simulated hospitals on this machine, `medfed simulate` end to end.

10,000 synthetic hospitals (about 40 rows each), a 5% sample trains and evaluates each round
(`federation.strategy.fraction_train=0.05`, `fraction_evaluate=0.05`), 3 rounds, the MLP of
configs/heart.yaml, adaptation off. Every node still gets the final model at the end. Peak RSS
and CPU are summed over the whole process tree (psutil, every 0.5 s); the run must finish with
exit code 0 and a signed registry.
"""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks import emulate
from benchmarks.overhead import CONFIG, ONE_THREAD, ROWS_PER_SITE
from benchmarks.util import WORK, bench_env, fmt, md_table, medfed, require_ok, run_cmd

FULL = (10_000, 3, 0.05)  # hospitals, rounds, fraction sampled per round
QUICK = (1_000, 2, 0.05)


def overrides(hospitals: int, rounds: int, fraction: float) -> list[str]:
    """The synthetic-source run with a sampled fraction of the hospitals per round."""
    return [
        "name=scale", "pretrain.data.source=synthetic", "pretrain.data.sites=[]",
        "pretrain.optim.epochs=2",
        "federation.data.source=synthetic", f"federation.data.synthetic_sites={hospitals}",
        f"federation.data.synthetic_samples={hospitals * ROWS_PER_SITE}",
        # min_nodes is also the least Flower samples per round: keep it small, or every
        # hospital trains (the server still waits for all of them before round 0)
        "federation.strategy.min_nodes=2",
        f"federation.strategy.fraction_train={fraction}",
        f"federation.strategy.fraction_evaluate={fraction}", f"federation.rounds={rounds}",
        "federation.adaptation.enabled=false",
    ]


def run(quick: bool) -> dict[str, Any]:
    """One run at the largest size."""
    from common.config_check import load_config

    hospitals, rounds, fraction = QUICK if quick else FULL
    home = WORK / "home"
    ovr = overrides(hospitals, rounds, fraction)
    bundle = emulate.bundle_for(load_config(CONFIG, ovr), home / "bundles",
                                home / "signing.key")
    run_dir = WORK / "scale" / f"{hospitals}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    log = WORK / "logs" / f"scale-{hospitals}.log"
    load = [round(v, 2) for v in os.getloadavg()]
    res = run_cmd(medfed("simulate", "--config", str(CONFIG),
                         *[a for o in ovr for a in ("--set", o)], "--bundle", str(bundle),
                         "--out", str(run_dir)), {**bench_env(home), **ONE_THREAD}, log,
                  progress=run_dir / "metrics.jsonl", interval=0.5)
    require_ok(res, log)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    elapsed = [json.loads(line)["elapsed_s"] for line in lines]
    return {
        "hospitals": hospitals, "rounds": rounds, "fraction": fraction,
        "sampled_per_round": round(hospitals * fraction), "wall_s": res.wall_s,
        "cpu_s": res.cpu_s, "peak_rss_gb": res.peak_rss_bytes / 2**30,
        "round_s": [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)],
        "latest_version": summary["latest"]["version"], "load_average_at_start": load,
        "headline": {"max_hospitals_simulated": hospitals,
                     "max_hospitals_sampled_fraction": fraction,
                     "peak_rss_gb_max_hospitals": res.peak_rss_bytes / 2**30},
    }


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    row = [str(res["hospitals"]), f"{res['fraction']:g} ({res['sampled_per_round']})",
           str(res["rounds"]), f"{res['wall_s']:.0f} s", f"{res['cpu_s']:.0f} s",
           ", ".join(f"{s:.1f}" for s in res["round_s"]), fmt(res["peak_rss_gb"], 2),
           f"v{res['latest_version']:04d}", str(res["load_average_at_start"][0])]
    return md_table(["hospitals", "sampled per round", "rounds", "wall", "CPU (all processes)",
                     "round wall times (s)", "peak RSS GB (all processes)", "latest version",
                     "1-min load at start"], [row])
