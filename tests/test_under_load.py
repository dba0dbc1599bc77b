"""`make test-load` (tests/under_load.py): pytest beside busy loops, which are always stopped."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import PROJECT
from tests.flower_helpers import processes, snapshot
from tests.limits import COMMAND_S


def _run(*args: str) -> tuple[int, dict, list[int]]:
    """Exit code, the printed figures, and busy loops started since that are still alive.

    The inner pytest runs in one process (`-n 0`): two xdist workers starting beside the
    hogs cost this suite half a minute and check nothing more. One hog: each burns a core for
    as long as the inner pytest runs, and a second checks nothing the first does not."""
    before = snapshot()
    done = subprocess.run([sys.executable, "-m", "tests.under_load", "--hogs", "1", *args,
                           "-n", "0"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=COMMAND_S)
    line = next(x for x in done.stdout.splitlines() if x.startswith("under load: "))
    left = [p.pid for p in processes() if (p.pid, p.start) not in before
            and "while True:" in p.cmdline and p.state not in "ZX"]
    return done.returncode, json.loads(line.removeprefix("under load: ")), left


def test_a_passing_selection_passes_and_the_hogs_are_gone() -> None:
    code, figures, left = _run("-p", "no:cacheprovider",
                               "tests/test_metrics.py::test_average_ranks_equal_scipys_with_ties")
    assert code == 0 and figures["pytest_exit_code"] == 0 and figures["hogs"] == 1
    assert left == []


def test_a_failing_selection_gives_pytests_exit_code() -> None:
    code, figures, left = _run("-p", "no:cacheprovider", "tests/test_metrics.py::no_such_test")
    assert code != 0 and figures["pytest_exit_code"] == code
    assert left == []
