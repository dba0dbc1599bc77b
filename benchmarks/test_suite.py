"""Benchmark 8: how long the test suite takes, idle and beside CPU hogs.

Runs what `make test` runs (`python -m pytest -q`) in this checkout, then `tests.under_load`
(`make test-load`). Run it in a fresh clone after `make install` for the figure CI would see:
`python -m benchmarks.run --only test_suite`. Both runs must pass; the figures are their wall
times and the 1-minute load average seen during each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.util import ROOT, WORK, LoadSampler, md_table


def _pytest(cmd: list[str], log_name: str) -> dict[str, Any]:
    log = WORK / "logs" / log_name
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with LoadSampler() as load, log.open("wb") as out:
        code = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    tail = log.read_text(errors="replace").strip().splitlines()
    summary = next((line for line in reversed(tail) if " passed" in line or " failed" in line),
                   tail[-1] if tail else "")
    return {"exit_code": code, "wall_s": round(wall, 1), "summary": summary.strip("= "),
            **load.figures(), "log": str(log)}


def run(quick: bool) -> dict[str, Any]:
    """The fast suite only in quick mode; else the whole suite, idle then loaded."""
    selection = ["-m", "not slow"] if quick else []
    idle = _pytest([sys.executable, "-m", "pytest", "-q", *selection], "test-suite-idle.log")
    loaded = _pytest([sys.executable, "-m", "tests.under_load", *selection],
                     "test-suite-loaded.log")
    for name, res in (("idle", idle), ("loaded", loaded)):
        if res["exit_code"] != 0:
            raise RuntimeError(f"the {name} test run failed: {res['summary']} (log {res['log']})")
    last = (WORK / "logs" / "test-suite-loaded.log").read_text(errors="replace")
    figures = next((json.loads(line.split("under load: ", 1)[1]) for line in
                    reversed(last.splitlines()) if line.startswith("under load: ")), {})
    return {"idle": idle, "loaded": loaded, "hogs": figures.get("hogs"),
            "cores": os.cpu_count(), "selection": " ".join(selection) or "all",
            "headline": {"make_test_seconds_idle": idle["wall_s"],
                         "make_test_seconds_loaded": loaded["wall_s"],
                         "make_test_loaded_load_1min_mean": loaded["load_1min_mean"]}}


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    rows = [[name, res[name]["summary"], f"{res[name]['wall_s']:.0f} s",
             str(res[name]["load_1min_mean"]), str(res[name]["load_1min_max"])]
            for name in ("idle", "loaded")]
    return "\n\n".join([
        f"Tests: {res['selection']}; {res['cores']} cores; loaded = beside {res['hogs']} "
        "busy-loop processes.",
        md_table(["run", "pytest", "wall", "mean 1-min load", "max 1-min load"], rows)])
