"""Run medfed's benchmarks and write their results: `python -m benchmarks.run [--quick]`.

A full run (`make bench`) writes `benchmarks/results/<name>.json`, `results/headline.json` and
`benchmarks/RESULTS.md`. `--quick` (`make bench QUICK=1`, under 10 minutes) runs every
benchmark on smaller sizes and writes the same files under `benchmarks/results/tmp/quick/`, so
the committed full-run numbers are never replaced by quick ones. `--only a,b` runs some
benchmarks and re-renders the report from the stored results of the others; `--render` only
re-renders the report and headline from the stored results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.gpu_check import NOT_RUN
from benchmarks.util import RESULTS, WORK, machine

BENCHMARKS = ("heart", "breast", "overhead", "scale", "communication", "feature_cache",
              "deployment", "deploy_vs_flower", "defences", "test_suite")


def run_one(name: str, quick: bool, command: str) -> dict[str, Any]:
    """Run one benchmark module; failures are recorded, not raised."""
    module = importlib.import_module(f"benchmarks.{name}")
    info = machine()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        result: dict[str, Any] = module.run(quick)
    except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}"[:2000]}
    result.update({"benchmark": name, "quick": quick, "started": started, "machine": info,
                   "command": command,
                   "load_average_at_end": info_load(),
                   "wall_s": round(time.perf_counter() - t0, 1)})
    return result


def keep_stored(path: Path, failure: dict[str, Any]) -> dict[str, Any]:
    """What to store after a failed run: the stored figures, if any, with the failure noted
    (a broken benchmark must not erase the last good result), else the failure itself."""
    try:
        stored: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return failure
    if "error" in stored:
        return failure
    stored.pop("last_failure", None)
    note = {k: failure[k] for k in ("error", "started", "command", "wall_s") if k in failure}
    return {**stored, "last_failure": note}


def info_load() -> list[float]:
    """1/5/15-minute load average now."""
    import os

    return [round(v, 2) for v in os.getloadavg()]


def headline(results: dict[str, dict[str, Any]], command: str, wall: float | None
             ) -> dict[str, Any]:
    """One flat dict of the headline figures (null where not measured)."""
    out: dict[str, Any] = {key: None for key in report.TARGETS}
    for name, res in results.items():
        module = importlib.import_module(f"benchmarks.{name}") if name in BENCHMARKS else None
        # the split and any note on the rule, also for results stored before they were added
        notes = getattr(module, "headline_notes", None)
        figures = notes(res) if notes is not None else res.get("headline", {})
        out.update({k: v for k, v in figures.items() if k in out})
    out["gpu_check"] = gpu_check_headline(gpu_record())
    timed = [r for r in results.values() if "started" in r]
    freshest = max(timed, key=lambda r: r["started"]) if timed else {}
    out.update({
        # when and where the freshest of these numbers was measured (UTC, the machine and its
        # load then), not when this file was written: --render must not restamp them
        "date": freshest.get("started") or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": freshest.get("machine") or machine(),
        "command": command,
        "total_wall_s": wall,
    })
    return out


def gpu_record() -> dict[str, Any] | None:
    """What `benchmarks/gpu_check.sh` recorded on a GPU machine (None: never run)."""
    path = RESULTS / "gpu_check.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def gpu_check_headline(record: dict[str, Any] | None) -> str | dict[str, Any]:
    """The headline's few figures of the GPU check (all of it: RESULTS.md section 9), or why
    there is nothing."""
    if record is None:
        return NOT_RUN
    keys = ("device", "train_images_per_s_cuda", "train_images_per_s_cpu_1_thread",
            "train_event_devices", "headline_validation_auc", "headline_test_auc",
            "headline_simulate_wall_s")
    return {k: record[k] for k in keys if k in record}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.run`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 10 minutes")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--render", action="store_true",
                        help="run nothing; rewrite the report and headline from stored results")
    args = parser.parse_args(argv)
    chosen = [] if args.render else [b for b in args.only.split(",") if b] or list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    out_dir = WORK / "quick" if args.quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.run" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "") + (" --render" if args.render else "")
    t0 = time.perf_counter()
    for name in chosen:
        print(f"[bench] {name} ({'quick' if args.quick else 'full'})", flush=True)
        res = run_one(name, args.quick, command)
        path = out_dir / f"{name}.json"
        if "error" in res:
            res = keep_stored(path, res)
        path.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        failed = res.get("error") or res.get("last_failure", {}).get("error")
        print(f"[bench] {name}: {'FAILED ' + failed if failed else 'done'} "
              f"in {res['wall_s']:.0f} s", flush=True)
    wall = round(time.perf_counter() - t0, 1)
    results = {}
    for name in BENCHMARKS:
        path = out_dir / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
    # the sum over the stored benchmarks, so that `--only` re-runs keep a meaningful total
    total = round(sum(r.get("wall_s", 0.0) for r in results.values()), 1)
    # the commands that produced the stored results (a full run, then maybe `--only` re-runs)
    commands = list(dict.fromkeys(r.get("command", command) for r in results.values()))
    head = headline(results, "; ".join(commands) or command, total)
    (out_dir / "headline.json").write_text(json.dumps(head, indent=2) + "\n", encoding="utf-8")
    md_path = (out_dir / "RESULTS.md") if args.quick else RESULTS.parent / "RESULTS.md"
    md_path.write_text(report.render(results, head, gpu_record()), encoding="utf-8")
    print(f"[bench] wrote {md_path} and {out_dir / 'headline.json'} ({wall:.0f} s)")
    return 1 if any("error" in results[n] or "last_failure" in results[n]
                    for n in chosen if n in results) else 0


if __name__ == "__main__":
    sys.exit(main())

