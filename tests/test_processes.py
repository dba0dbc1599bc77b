"""Every process medfed starts dies with it: also detached grandchildren (as Flower's
SuperLink detaches `flower-superexec`), also when medfed itself is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.processes import (
    DirectoryInUse,
    ProcessGroup,
    alive,
    bind_problem,
    kill_stale_groups,
    marked_pids,
)
from tests.limits import GONE_WITHIN_S, STOP_S

ROOT = Path(__file__).resolve().parents[1]

# A child that starts a grandchild in a new session (escaping the child's process group,
# as flower-superlink does with flower-superexec) and writes the grandchild's pid.
CHILD = textwrap.dedent("""
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                  start_new_session=True)
    open(sys.argv[1], "w").write(str(grandchild.pid))
    time.sleep(600)
""")

# A child that starts a grandchild in its own process group whose environment lacks the
# marker (as Ray's raylet starts its dashboard and runtime-env agents), and writes its pid.
CHILD_UNMARKED = textwrap.dedent("""
    import os, subprocess, sys, time
    env = {k: v for k, v in os.environ.items() if k != "MEDFED_PROCESS_GROUP"}
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                  env=env)
    open(sys.argv[1], "w").write(str(grandchild.pid))
    time.sleep(600)
""")

# A medfed-like parent: one ProcessGroup, one child, then it waits to be killed.
PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from common.processes import ProcessGroup
    group = ProcessGroup(Path(sys.argv[1]))
    group.start([sys.executable, "-c", sys.argv[2], sys.argv[3]])
    print("started", flush=True)
    time.sleep(600)
""")


def _wait_file(path: Path, timeout: float = STOP_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.1)
    raise AssertionError(f"{path} was not written within {timeout} s")


def _gone(pids: list[int], timeout: float = GONE_WITHIN_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_stop_all_stops_a_detached_grandchild(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "processes.pid")
    child = group.start([sys.executable, "-c", CHILD, str(tmp_path / "grandchild")])
    grandchild = int(_wait_file(tmp_path / "grandchild"))
    try:
        assert grandchild in marked_pids(group.token)
        group.stop_all()
        assert _gone([child.pid, grandchild]) == []
        assert not (tmp_path / "processes.pid").exists()
    finally:
        for pid in (child.pid, grandchild):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("child", [CHILD, CHILD_UNMARKED], ids=["detached", "unmarked"])
def test_sigkill_of_the_parent_leaves_no_process_behind(tmp_path: Path, child: str) -> None:
    pid_file = tmp_path / "processes.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(pid_file), child, str(tmp_path / "grandchild")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    grandchild = 0
    try:
        grandchild = int(_wait_file(tmp_path / "grandchild"))
        if child == CHILD:  # the watchdog lists every marked process, detached ones too
            deadline = time.monotonic() + STOP_S
            while str(grandchild) not in pid_file.read_text().split() \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            listed = pid_file.read_text().split()
            assert str(grandchild) in listed
        children = [int(p) for p in pid_file.read_text().splitlines()[2:]]
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=STOP_S)
        assert _gone(children + [grandchild]) == [], "a process outlived its medfed parent"
    finally:
        parent.kill()
        if grandchild and alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_a_directory_still_in_use_is_not_taken_over(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "processes.pid")
    group.start([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        # the same pid file seen from another medfed command: its owner is alive
        other = tmp_path / "other.pid"
        text = (tmp_path / "processes.pid").read_text()
        other.write_text(text.replace(f"owner {os.getpid()}", f"owner {os.getppid()}"))
        with pytest.raises(DirectoryInUse, match="in use by a running medfed command"):
            kill_stale_groups(other)
        assert marked_pids(group.token)  # nothing was stopped
    finally:
        group.stop_all()


def test_a_crashed_run_is_cleaned_up_on_the_next_start(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "processes.pid")
    child = group.start([sys.executable, "-c", "import time; time.sleep(600)"])
    saved = (tmp_path / "processes.pid").read_text()
    # the owner of this copy is a process that exited (a crashed medfed)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / "stale.pid"
    stale.write_text(saved.replace(f"owner {os.getpid()}", f"owner {dead}"))
    try:
        kill_stale_groups(stale)
        assert _gone([child.pid]) == []
        assert not stale.exists()
    finally:
        group.stop_all()


@pytest.mark.parametrize(("host", "port", "problem"), [
    ("127.0.0.1", 0, "is outside 1-65535"),
    ("127.0.0.1", 70000, "is outside 1-65535"),
    # TEST-NET-1 (RFC 5737): never an address of this machine; no name lookup
    ("192.0.2.1", 9000, "cannot be opened: '192.0.2.1' is not an address of this machine"),
])
def test_a_port_that_cannot_be_opened_says_why_not_that_it_is_in_use(host, port, problem
                                                                     ) -> None:
    """These used to read as 'in use' (or end in OverflowError from bind)."""
    assert bind_problem(host, port) == problem


def test_a_port_in_use_says_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert bind_problem("127.0.0.1", port) == "is in use"
    assert bind_problem("127.0.0.1", port) is None
