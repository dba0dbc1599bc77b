"""`make test-load`: the whole test suite beside CPU hogs, to check it holds on a busy laptop.

    python -m tests.under_load [--hogs N] [pytest args...]

Starts N busy-loop processes (default: 1.5 x the cores, which with the suite's own work keeps
the load average near twice the core count), runs pytest, samples the 1-minute load average
every 15 s, and prints the wall time and the load seen. The hogs are stopped whatever happens.
Exit code: pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from benchmarks.util import LoadSampler

BUSY_LOOP = "while True:\n    pass\n"


def main(argv: list[str]) -> int:
    """Run pytest under load; print (and return) its outcome with the load figures."""
    parser = argparse.ArgumentParser(prog="python -m tests.under_load")
    cores = os.cpu_count() or 1
    parser.add_argument("--hogs", type=int, default=max(1, cores * 3 // 2),
                        help="busy-loop processes to run beside the suite")
    args, pytest_args = parser.parse_known_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], start_new_session=True)
            for _ in range(args.hogs)]
    start = time.monotonic()
    try:
        with LoadSampler() as load:
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", *pytest_args])
    finally:
        for hog in hogs:
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()
    wall = time.monotonic() - start
    figures = {"pytest_exit_code": code, "wall_s": round(wall, 1), "cores": cores,
               "hogs": args.hogs, **load.figures()}
    print("under load: " + json.dumps(figures), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
