"""Start Flower's own processes and make sure every one of them is stopped again.

Each child leads its own process group, so whatever it starts (a ServerApp, ClientApps, Ray)
is stopped with it: SIGTERM to the group, then SIGKILL to what is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

STOP_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child (preexec_fn): get SIGTERM when the parent dies, even by `kill -9` (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the pid-file cleanup in `kill_stale_groups` still applies
        pass


def kill_stale_groups(pid_file: Path) -> None:
    """Stop process groups a previous, crashed incarnation recorded in `pid_file`."""
    if not pid_file.exists():
        return
    for text in pid_file.read_text(encoding="utf-8").split():
        try:
            os.killpg(int(text), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
    pid_file.unlink(missing_ok=True)


def _group_empty(proc: subprocess.Popen[bytes], pgid: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        proc.poll()  # reap the leader so the group can empty
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def stop_group(proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the child's process group, wait up to `grace`, then SIGKILL what is left."""
    pgid = proc.pid  # started with start_new_session: the child's pid is its group id
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        if _group_empty(proc, pgid, wait):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class ProcessGroup:
    """The processes one `medfed` command started; `stop_all` is safe to call twice."""

    def __init__(self, pid_file: Path | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.pid_file = pid_file  # process-group ids, for cleanup after a crash

    def start(self, cmd: Sequence[str], log_file: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `cmd` in a new session; output goes to `log_file` (or is inherited)."""
        out: IO[bytes] | None = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            out = log_file.open("ab")
            self._logs.append(out)
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT if out else None,
            env={**os.environ, **(env or {})}, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.procs.append(proc)
        self._record()
        return proc

    def _record(self) -> None:
        if self.pid_file is not None:
            text = " ".join(str(p.pid) for p in self.procs)
            self.pid_file.write_text(text + "\n", encoding="utf-8")

    def stop_all(self) -> None:
        """Stop every process started here, newest first."""
        for proc in reversed(self.procs):
            stop_group(proc)
        self.procs.clear()
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        for fh in self._logs:
            fh.close()
        self._logs.clear()


def wait_for_port(host: str, port: int, timeout: float,
                  proc: subprocess.Popen[bytes] | None = None) -> bool:
    """True once something accepts TCP connections on host:port; False on timeout/exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (for tests and local runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
