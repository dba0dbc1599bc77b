"""Start Flower's own processes and make sure every one of them is stopped again.

Flower detaches some of its children (the SuperLink starts `flower-superexec` in a new session,
which starts `flwr-serverapp`), so a process group does not hold them all. Every process a
:class:`ProcessGroup` starts therefore carries one environment marker, inherited by all its
descendants; stopping means: SIGTERM to each child's group, then every process that still
carries the marker is sent SIGTERM, then SIGKILL. A small watchdog process (`common.watchdog`)
does the same (groups, then marker) when the medfed parent dies without stopping them, even
by `kill -9`, and keeps the pid file listing every marked process for cleanup after a crash of
both. Groups matter because not every descendant keeps the marker: Ray's raylet starts its
agents with an environment of its own.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from common.config import show

STOP_GRACE_S = 10.0
SWEEP_GRACE_S = 4.0  # marked stragglers get this long after SIGTERM before SIGKILL
MARKER_ENV = "MEDFED_PROCESS_GROUP"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child (preexec_fn): get SIGTERM when the parent dies, even by `kill -9` (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the watchdog and the pid-file cleanup still apply
        pass


def interrupt_on_sigterm() -> None:
    """SIGTERM (`kill`, systemd, `docker stop`) and SIGINT take the Ctrl-C path: the command's
    own cleanup stops what it started. Without a handler Python dies on the spot, and only the
    watchdog's sweep is left to stop its processes."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # a command started in the background by a script (`cmd &`) inherits SIGINT ignored and
    # Python then installs no Ctrl-C handler: `kill -INT` would be lost and the run go on
    signal.signal(signal.SIGINT, signal.default_int_handler)


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower's processes: private FLWR_HOME, our venv's tools first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return {"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _state(pid: int | str) -> str | None:
    """The process state letter from /proc (None: gone or unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]  # the name in parentheses may hold spaces


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return _state(pid) not in (None, "Z", "X")


def marked_pids(token: str) -> list[int]:
    """Live processes (not zombies) whose environment carries `MEDFED_PROCESS_GROUP=token`."""
    needle = f"{MARKER_ENV}={token}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def sweep(token: str, grace: float = SWEEP_GRACE_S) -> None:
    """SIGTERM every process marked with `token`; SIGKILL what is left after `grace`."""
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_pids(token)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                continue
        while pids and sig == signal.SIGTERM and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = marked_pids(token)
        if not pids:
            return


def write_pid_file(pid_file: Path, token: str, owner: int, pids: Sequence[int]) -> None:
    """`marker TOKEN`, `owner PID` (the medfed command), then one pid per line; atomic."""
    tmp = pid_file.with_name(f"{pid_file.name}.{os.getpid()}.tmp")  # one per writer
    tmp.write_text(f"marker {token}\nowner {owner}\n" + "".join(f"{p}\n" for p in pids),
                   encoding="utf-8")
    os.replace(tmp, pid_file)


class DirectoryInUse(FileExistsError):
    """Another live medfed command owns the processes recorded in a pid file."""


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's, alive
    return _state(pid) not in ("Z", "X")  # None: not Linux, and kill(0) said alive


def kill_stale_groups(pid_file: Path) -> None:
    """Stop what a previous, crashed incarnation recorded in `pid_file` (its marker).

    Raises DirectoryInUse when the command that wrote it is still running.
    """
    if not pid_file.exists():
        return
    fields = dict(line.split(" ", 1) for line in pid_file.read_text(encoding="utf-8")
                  .splitlines() if " " in line)
    owner = fields.get("owner", "")
    if owner.isdigit() and int(owner) != os.getpid() and _owner_alive(int(owner)) \
            and marked_pids(fields.get("marker", "")):
        raise DirectoryInUse(f"{pid_file.parent} is in use by a running medfed command "
                             f"(pid {owner}); stop it first or choose another directory")
    if "marker" in fields:
        sweep(fields["marker"])
    pid_file.unlink(missing_ok=True)


def _group_empty(proc: subprocess.Popen[Any], pgid: int, wait: float) -> bool:
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


def stop_group(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_S) -> None:
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
        self.procs: list[subprocess.Popen[Any]] = []
        self._logs: list[IO[bytes]] = []
        self.pid_file = pid_file  # every marked process, for cleanup after a crash
        self.token = secrets.token_hex(8)
        self._watchdog: subprocess.Popen[bytes] | None = None

    def start(self, cmd: Sequence[str], log_file: Path | None = None,
              env: dict[str, str] | None = None, capture: bool = False
              ) -> subprocess.Popen[Any]:
        """Start `cmd` in a new session; output goes to `log_file`, to a text pipe
        (`capture`) or is inherited."""
        self._start_watchdog()
        out: IO[bytes] | int | None = None
        if capture:
            out = subprocess.PIPE
        elif log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            out = log_file.open("ab")
            self._logs.append(out)
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT if out is not None else None,
            env={**os.environ, **(env or {}), MARKER_ENV: self.token},
            start_new_session=True, preexec_fn=die_with_parent, text=capture,
        )
        self.procs.append(proc)
        self._tell_watchdog(f"group {proc.pid}\n")  # its own session: pid = process group
        if self.pid_file is not None:
            write_pid_file(self.pid_file, self.token, os.getpid(), [p.pid for p in self.procs])
        return proc

    def _start_watchdog(self) -> None:
        if self._watchdog is not None:
            return
        cmd = [sys.executable, "-m", "common.watchdog", self.token, str(self.pid_file or "")]
        # its own session: a Ctrl-C for medfed is medfed's to handle, not the watchdog's
        self._watchdog = subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True,
                                          env={k: v for k, v in os.environ.items()
                                               if k != MARKER_ENV})

    def _tell_watchdog(self, line: str) -> bool:
        try:
            assert self._watchdog is not None and self._watchdog.stdin is not None
            self._watchdog.stdin.write(line.encode())
            self._watchdog.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def stop_all(self) -> None:
        """Stop every process started here (newest first), then anything that carries the
        marker; the watchdog is told to leave."""
        for proc in reversed(self.procs):
            stop_group(proc)
        sweep(self.token)
        self.procs.clear()
        if self._watchdog is not None:
            if self._tell_watchdog("exit\n"):
                try:
                    assert self._watchdog.stdin is not None
                    self._watchdog.stdin.close()
                except (BrokenPipeError, OSError):
                    pass
            try:
                self._watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
            self._watchdog = None
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        for fh in self._logs:
            fh.close()
        self._logs.clear()


def bind_problem(host: str, port: int) -> str | None:
    """Why nothing can listen on `host`:`port` (the end of a sentence starting with the port
    and host), or None when it can. A port outside 1-65535 or a host that is no address of
    this machine is said as such, not as a port in use."""
    if not 0 < port < 65536:
        return "is outside 1-65535"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return f"cannot be opened: the host {show(host)} does not resolve"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return "is in use"
            if err.errno == errno.EADDRNOTAVAIL:
                return f"cannot be opened: {show(host)} is not an address of this machine"
            if err.errno == errno.EACCES:
                return "needs privileges this user lacks (a port below 1024?)"
            return f"cannot be opened ({err.strerror})"
    return None


def wait_for_port(host: str, port: int, timeout: float,
                  proc: subprocess.Popen[Any] | None = None) -> bool:
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
