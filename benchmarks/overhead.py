"""Benchmark 3: simulation overhead, `medfed simulate` vs a bare PyTorch loop, same work.

Both sides use the SYNTHETIC source (federation.data.source=synthetic, N hospitals), the same
pretrained MLP bundle, the same local steps and seeds, and per round do the same work: every
sampled hospital trains the head (`train_local`) and every hospital evaluates the global model
on its local validation and test splits (heart.yaml's held-out set is the sites' validation,
scored at the sites). The bare loop runs in one process, hospitals one after another; the
simulation runs Flower's runtime with Ray (one CPU per simulated node) and adds what the
product does (messages, backbone provisioning, reply checks, signed registry versions, final
model delivery). The simulation runs twice: as configured by default (a train and then an
evaluate message per node per round) and with `federation.evaluate_with_train` (the
evaluation travels with the next train message: one message per node per round). A fourth
side runs the bare loop's work as a plain Flower app (`benchmarks/plain_sim.py`): what
Flower's runtime costs without medfed. All sides run with one thread per process
(OMP/MKL/torch), so CPU time compares work, not idle spinning. Sides alternate (bare,
simulate, simulate with evaluate_with_train, plain Flower; then reversed), three times per
size.

CPU time is summed over the whole process tree (psutil, every 0.1 s); 'per round' compares
rounds 2+ (round 1 carries Ray's start, actor warm-up and backbone provisioning): the tree's
CPU between the end of round 1 and the end of the last round, found as metrics.jsonl grows.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import emulate
from benchmarks.util import (
    ROOT,
    WORK,
    CmdResult,
    bench_env,
    fmt,
    md_table,
    medfed,
    require_ok,
    run_cmd,
)

CONFIG = ROOT / "configs" / "heart.yaml"
SIZES_FULL = ((10, 10), (100, 5), (1000, 3))  # (hospitals, rounds)
SIZES_QUICK = ((100, 3),)
REPEATS_FULL, REPEATS_QUICK = 3, 1
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
FOLD = "federation.evaluate_with_train=true"  # the simulate side with one message per node
ROWS_PER_SITE = 40  # synthetic rows per hospital on average (geometric sizes, >= 4 each)


def overrides(hospitals: int, rounds: int) -> list[str]:
    """The synthetic-source run: N hospitals, all sampled every round, no adaptation."""
    return [
        "name=overhead", "pretrain.data.source=synthetic", "pretrain.data.sites=[]",
        "pretrain.optim.epochs=2",
        "federation.data.source=synthetic", f"federation.data.synthetic_sites={hospitals}",
        f"federation.data.synthetic_samples={hospitals * ROWS_PER_SITE}",
        f"federation.strategy.min_nodes={hospitals}", "federation.strategy.fraction_train=1.0",
        "federation.strategy.fraction_evaluate=1.0", f"federation.rounds={rounds}",
        "federation.adaptation.enabled=false",
    ]


def bare(request: dict[str, Any]) -> dict[str, Any]:
    """The bare loop (run in its own process by :func:`measure`); per-round wall times."""
    import torch

    torch.set_num_threads(1)
    from common.config_check import load_config
    from common.data.federated import load_federated
    from common.device import seed_everything
    from common.models import load_state, set_trainable
    from common.scoring import OperatingPoint, score_splits
    from common.training import train_local

    cfg = load_config(CONFIG, request["overrides"])
    home = Path(request["home"])
    model, norm = emulate.start_model(cfg, Path(request["bundle"]), home / "signing.key")
    data = load_federated(cfg.federation.data, norm, seed=cfg.seed)
    names = set_trainable(model, cfg.model.trainable)
    inputs = emulate.site_inputs(model, data.sites, cfg.model.trainable)
    state = model.state_dict()
    current = {n: state[n].clone() for n in names}
    aggregate = emulate.Aggregator(cfg)
    device = torch.device("cpu")
    rounds, cpu = [], []
    for rnd in range(1, cfg.federation.rounds + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        replies = []
        for pid, inp in enumerate(inputs):
            local = copy.deepcopy(model)
            load_state(local, current, where="bare loop")
            seed = emulate.node_seed(cfg, pid, rnd)
            seed_everything(seed)
            res = train_local(local, inp.x_train, inp.site.y_train, cfg.federation.local,
                              cfg.model.trainable, device, seed, features_cached=inp.cached)
            sd = local.state_dict()
            replies.append(({n: sd[n].detach().clone() for n in names}, res.num_examples))
        current = aggregate(current, replies)
        load_state(model, current, where="bare loop")
        for inp in inputs:  # as each node does: the global model on its val and test rows
            score_splits(model, [(inp.site.x_val, inp.site.y_val),
                                 (inp.site.x_test, inp.site.y_test)], OperatingPoint())
        rounds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return {"round_s": rounds, "round_cpu_s": cpu}


def _per_round_after_start(times: list[float]) -> float:
    """Mean per round without round 1 (start-up, provisioning, warm-up)."""
    later = times[1:] if len(times) > 1 else times
    return sum(later) / len(later)


def _bare(ovr: list[str], bundle: Path, home: Path, tag: str) -> dict[str, Any]:
    request = json.dumps({"overrides": ovr, "bundle": str(bundle), "home": str(home)})
    log = WORK / "logs" / f"overhead-bare-{tag}.log"
    res = run_cmd([sys.executable, "-m", "benchmarks.overhead", "bare", request],
                  {**bench_env(home), **ONE_THREAD}, log, interval=0.1)
    require_ok(res, log)
    inner = json.loads(log.read_text().strip().splitlines()[-1])
    return {"wall_s": res.wall_s, "cpu_s": res.cpu_s, "peak_rss_gb": res.peak_rss_bytes / 2**30,
            "round_s": inner["round_s"], "round_cpu_s": inner["round_cpu_s"],
            "per_round_wall_s": _per_round_after_start(inner["round_s"]),
            "per_round_cpu_s": _per_round_after_start(inner["round_cpu_s"])}


def _simulate(ovr: list[str], bundle: Path, home: Path, tag: str) -> dict[str, Any]:
    """`medfed simulate`; with :data:`FOLD` among `ovr` its lines lag a round (see below)."""
    run_dir = WORK / "overhead" / tag
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    sets = [a for o in ovr for a in ("--set", o)]
    log = WORK / "logs" / f"overhead-sim-{tag}.log"
    res = run_cmd(medfed("simulate", "--config", str(CONFIG), *sets, "--bundle", str(bundle),
                         "--out", str(run_dir)), {**bench_env(home), **ONE_THREAD}, log,
                  progress=run_dir / "metrics.jsonl", interval=0.1)
    require_ok(res, log)
    return _rounds_of(res, run_dir / "metrics.jsonl", lag=1 if FOLD in ovr else 0)


def _plain(ovr: list[str], bundle: Path, home: Path, tag: str) -> dict[str, Any]:
    """The same work as a plain Flower simulation (`benchmarks/plain_sim.py`)."""
    progress = WORK / "overhead" / f"{tag}-rounds.jsonl"
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.unlink(missing_ok=True)
    request = json.dumps({"config": str(CONFIG), "overrides": ovr, "bundle": str(bundle),
                          "home": str(home), "progress": str(progress)})
    log = WORK / "logs" / f"overhead-flower-{tag}.log"
    res = run_cmd([sys.executable, "-m", "benchmarks.plain_sim", request],
                  {**bench_env(home), **ONE_THREAD}, log, progress=progress, interval=0.1)
    require_ok(res, log)
    return _rounds_of(res, progress)


def _rounds_of(res: CmdResult, progress: Path, lag: int = 0) -> dict[str, Any]:
    """Whole-run and per-round (2+) figures of a run whose `progress` file gets one JSON line
    per round, round 0 (the initial model) first, each with `elapsed_s`.

    Line r ends round r, except with `federation.evaluate_with_train` (`lag=1`): the line of
    version r waits for its scores, which come back with round r + 1's training, so line r
    ends round r + 1 and the last line ends an evaluation-only exchange, no round.
    """
    lines = progress.read_text().splitlines()
    elapsed = [json.loads(line)["elapsed_s"] for line in lines]  # one per version 0..R
    rounds = len(elapsed) - 1
    cpu_marks = res.cpu_at_line  # tree CPU when each line appeared

    def end_of(r: int) -> int:  # the line written when round r's training ended
        return r - lag

    per_round_cpu = per_round_wall = None
    if rounds > 1 and len(cpu_marks) > end_of(rounds):
        per_round_cpu = (cpu_marks[end_of(rounds)] - cpu_marks[end_of(1)]) / (rounds - 1)
        per_round_wall = (elapsed[end_of(rounds)] - elapsed[end_of(1)]) / (rounds - 1)
    wall_rounds = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    return {"wall_s": res.wall_s, "cpu_s": res.cpu_s, "peak_rss_gb": res.peak_rss_bytes / 2**30,
            "round_s": wall_rounds, "per_round_wall_s": per_round_wall,
            "per_round_cpu_s": per_round_cpu}


def _spread(values: list[float | None]) -> dict[str, Any]:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


SIDES = ("bare", "sim", "fold", "flower")
RUNNERS = {"sim": _simulate, "fold": lambda ovr, *rest: _simulate(ovr + [FOLD], *rest),
           "flower": _plain}


def measure(hospitals: int, rounds: int, home: Path, repeats: int) -> dict[str, Any]:
    """The four sides for one size, alternated `repeats` times; the figures of the tables.

    `sim` is `medfed simulate` as configured by default (train, then evaluate messages);
    `fold` the same run with `federation.evaluate_with_train` (one message per node per round);
    `flower` the bare loop's work as a plain Flower simulation (`benchmarks/plain_sim.py`).
    """
    from common.config_check import load_config

    ovr = overrides(hospitals, rounds)
    cfg = load_config(CONFIG, ovr)
    bundle = emulate.bundle_for(cfg, home / "bundles", home / "signing.key")
    reps: list[dict[str, Any]] = []
    for rep in range(repeats):
        tag = f"{hospitals}x{rounds}-r{rep}"
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        load = [round(v, 2) for v in os.getloadavg()]
        sides = {side: _bare(ovr, bundle, home, tag) if side == "bare" else
                 RUNNERS[side](ovr, bundle, home, f"{tag}-{side}") for side in order}
        reps.append({"order": list(order), "load_average_at_start": load, **sides})
        print(f"    {hospitals} hospitals, repeat {rep + 1}: per round (2+) CPU simulate "
              f"{fmt(sides['sim']['per_round_cpu_s'], 2)} s, with evaluate_with_train "
              f"{fmt(sides['fold']['per_round_cpu_s'], 2)} s, plain Flower "
              f"{fmt(sides['flower']['per_round_cpu_s'], 2)} s, bare "
              f"{sides['bare']['per_round_cpu_s']:.2f} s", flush=True)

    def ratio(side: str, key: str, r: dict[str, Any], base: str = "bare") -> float | None:
        num, den = r[side][key], r[base][key]
        return num / den if num is not None and den else None

    out: dict[str, Any] = {"hospitals": hospitals, "rounds": rounds, "repeats": reps}
    for side, pre in (("sim", ""), ("fold", "fold_"), ("flower", "flower_")):
        out.update({
            f"{pre}cpu_ratio": _spread([ratio(side, "cpu_s", r) for r in reps]),
            f"{pre}cpu_ratio_per_round": _spread([ratio(side, "per_round_cpu_s", r)
                                                  for r in reps]),
            f"{pre}wall_ratio": _spread([ratio(side, "wall_s", r) for r in reps]),
            f"{pre}wall_ratio_per_round": _spread([ratio(side, "per_round_wall_s", r)
                                                   for r in reps]),
            f"{side}_cpu_s": _spread([r[side]["cpu_s"] for r in reps]),
            f"{side}_per_round_cpu_s": _spread([r[side]["per_round_cpu_s"] for r in reps]),
            f"{side}_wall_s": _spread([r[side]["wall_s"] for r in reps]),
            f"{side}_peak_rss_gb": max(r[side]["peak_rss_gb"] for r in reps),
        })
    # medfed's own share: the one-message-per-node run against plain Flower doing the same work
    out["fold_vs_flower_cpu_ratio_per_round"] = _spread(
        [ratio("fold", "per_round_cpu_s", r, "flower") for r in reps])
    out.update({
        "bare_cpu_s": _spread([r["bare"]["cpu_s"] for r in reps]),
        "bare_per_round_cpu_s": _spread([r["bare"]["per_round_cpu_s"] for r in reps]),
        "bare_wall_s": _spread([r["bare"]["wall_s"] for r in reps]),
        "bare_peak_rss_gb": max(r["bare"]["peak_rss_gb"] for r in reps),
    })
    return out


def run(quick: bool) -> dict[str, Any]:
    """All sizes; quick mode runs 100 hospitals x 3 rounds once."""
    home = WORK / "home"
    sizes = SIZES_QUICK if quick else SIZES_FULL
    repeats = REPEATS_QUICK if quick else REPEATS_FULL
    only = os.environ.get("MEDFED_BENCH_HOSPITALS")  # e.g. "10,100": a subset of the sizes
    if only:
        keep = {int(h) for h in only.split(",")}
        sizes = tuple(sz for sz in sizes if sz[0] in keep)
    rows = []
    for hospitals, rounds in sizes:
        rows.append(measure(hospitals, rounds, home, repeats))
        r = rows[-1]
        print(f"  overhead {hospitals} hospitals: CPU ratio per round (2+) median "
              f"{fmt(r['cpu_ratio_per_round']['median'], 2)}, whole run "
              f"{fmt(r['cpu_ratio']['median'], 2)}; with evaluate_with_train "
              f"{fmt(r['fold_cpu_ratio_per_round']['median'], 2)}; plain Flower "
              f"{fmt(r['flower_cpu_ratio_per_round']['median'], 2)}; evaluate_with_train / "
              f"plain Flower {fmt(r['fold_vs_flower_cpu_ratio_per_round']['median'], 2)}; "
              "peak RSS "
              f"{r['sim_peak_rss_gb']:.2f} GB", flush=True)
    by_size = {r["hospitals"]: r for r in rows}
    biggest = max(rows, key=lambda r: r["hospitals"])

    def per_round(h: int, pre: str = "") -> float | None:
        key = f"{pre}cpu_ratio_per_round"
        return by_size[h][key]["median"] if h in by_size and key in by_size[h] else None

    return {
        "rows": rows, "rows_per_site": ROWS_PER_SITE, "config": str(CONFIG.relative_to(ROOT)),
        "headline": {
            "sim_cpu_ratio_100": per_round(100),
            "sim_cpu_ratio_1000": per_round(1000),
            "sim_cpu_ratio_100_evaluate_with_train": per_round(100, "fold_"),
            "sim_cpu_ratio_1000_evaluate_with_train": per_round(1000, "fold_"),
            "plain_flower_cpu_ratio_100": per_round(100, "flower_"),
            "plain_flower_cpu_ratio_1000": per_round(1000, "flower_"),
            "sim_cpu_ratio_100_vs_plain_flower": per_round(100, "fold_vs_flower_"),
            "sim_cpu_ratio_1000_vs_plain_flower": per_round(1000, "fold_vs_flower_"),
        },
        "biggest": {"hospitals": biggest["hospitals"], "peak_rss_gb": biggest["sim_peak_rss_gb"]},
    }


def _cell(spread: dict[str, Any], digits: int = 2, unit: str = "") -> str:
    if spread["median"] is None:
        return "undef."
    med, lo, hi = (f"{spread[k]:.{digits}f}" for k in ("median", "min", "max"))
    return f"{med}{unit} [{lo}, {hi}]" if spread["n"] > 1 else f"{med}{unit}"


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    table = []
    for r in res["rows"]:
        for side, pre, label in (("sim", "", "simulate"),
                                 ("fold", "fold_", "simulate, evaluate_with_train"),
                                 ("flower", "flower_", "plain Flower, same work")):
            if f"{pre}cpu_ratio_per_round" not in r:
                continue  # results stored before this side existed
            table.append([
                str(r["hospitals"]), str(r["rounds"]), str(len(r["repeats"])), label,
                _cell(r[f"{side}_per_round_cpu_s"], 2, " s"),
                _cell(r["bare_per_round_cpu_s"], 2, " s"), _cell(r[f"{pre}cpu_ratio_per_round"]),
                _cell(r[f"{side}_cpu_s"], 1, " s"), _cell(r["bare_cpu_s"], 1, " s"),
                _cell(r[f"{pre}cpu_ratio"]), _cell(r[f"{pre}wall_ratio_per_round"]),
                _cell(r[f"{pre}wall_ratio"]), fmt(r[f"{side}_peak_rss_gb"], 2),
                ", ".join(str(x["load_average_at_start"][0]) for x in r["repeats"])])
    shares = [[str(r["hospitals"]), _cell(r["fold_per_round_cpu_s"], 2, " s"),
               _cell(r["flower_per_round_cpu_s"], 2, " s"),
               _cell(r["fold_vs_flower_cpu_ratio_per_round"])]
              for r in res["rows"] if "fold_vs_flower_cpu_ratio_per_round" in r]
    parts = [
        f"Synthetic source, about {res['rows_per_site']} rows per hospital, MLP of "
        f"`{res['config']}` (head trains), every hospital sampled every round. Median "
        "[min, max] over the repeats; ratios are side / bare, each repeat's sides run "
        "one after another (bare, simulate, simulate with evaluate_with_train, plain Flower; "
        "reversed in every other repeat). 'plain Flower, same work' is the bare loop's work "
        "in Flower's simulation runtime without medfed (`benchmarks/plain_sim.py`): its ratio "
        "is what the runtime costs.",
        md_table(["hospitals", "rounds", "repeats", "side", "side CPU / round (2+)",
                  "bare CPU / round (2+)", "CPU ratio / round (2+)", "side CPU, whole run",
                  "bare CPU, whole run", "CPU ratio, whole run", "wall ratio / round (2+)",
                  "wall ratio, whole run", "side peak RSS GB",
                  "1-min load at each repeat's start"], table),
    ]
    if shares:
        parts += ["medfed's own share: `medfed simulate` with `federation.evaluate_with_train` "
                  "against the plain Flower app, both one message per node per round, ratio "
                  "per repeat:",
                  md_table(["hospitals", "medfed simulate, evaluate_with_train CPU / round "
                            "(2+)", "plain Flower CPU / round (2+)",
                            "medfed / plain Flower"], shares)]
    return "\n\n".join(parts)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "bare":
    print(json.dumps(bare(json.loads(sys.argv[2]))))
