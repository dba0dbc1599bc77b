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

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

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
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process started here, newest first."""
        for proc in reversed(self.procs):
            stop_group(proc)
        self.procs.clear()
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
