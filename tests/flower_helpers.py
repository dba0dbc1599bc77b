"""Test helpers around Flower: call a ClientApp directly, and find processes a run left behind.

Flower's `Message` reads the sender's identity from `TaskIdentity`, a class-level slot that
Flower's runtime fills in each ClientApp process. Outside Flower it is empty and building a
message raises "TaskIdentity.run_id is not set", so :func:`task_identity` fills it for the
duration of a test (internal Flower API: kept in this one place).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

RUN_ID = 7
SERVER_NODE_ID = 0
CLIENT_NODE_ID = 11


@contextmanager
def task_identity(run_id: int = RUN_ID, node_id: int = SERVER_NODE_ID,
                  task_id: int = 1) -> Iterator[None]:
    """Set Flower's TaskIdentity so `Message(...)` works outside Flower; restore it after."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def call_client_app(app: ClientApp, message_type: str, content: RecordDict,
                    node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None,
                    ) -> Message:
    """Send one message to `app` as Flower's runtime would and return the reply.

    Needs :func:`task_identity` to be active. An exception in a handler propagates (Flower's
    runtime would turn it into an error reply carrying `str(exception)`).
    """
    msg = Message(content, dst_node_id=CLIENT_NODE_ID, message_type=message_type)
    ctx = Context(run_id=RUN_ID, node_id=CLIENT_NODE_ID, node_config=dict(node_config),
                  state=RecordDict(), run_config=dict(run_config or {}))
    return app(msg, ctx)


# --- processes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    """One live process as seen in /proc."""

    pid: int
    start: int  # start time in clock ticks since boot (with pid: unique)
    state: str
    ppid: int
    cmdline: str
    environ: str  # "" when unreadable


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone, or not ours
        return b""


def processes() -> list[Proc]:
    """Every process visible in /proc (psutil is not installed in this venv)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(entry / "stat").decode(errors="replace")
        if not stat:
            continue
        # the command name in parentheses may hold spaces: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        out.append(Proc(
            pid=int(entry.name), start=int(fields[19]), state=fields[0], ppid=int(fields[1]),
            cmdline=_read(entry / "cmdline").replace(b"\0", b" ").decode(errors="replace"),
            environ=_read(entry / "environ").replace(b"\0", b"\n").decode(errors="replace"),
        ))
    return out


def descendants(root: int) -> set[tuple[int, int]]:
    """(pid, start) of every live process below `root` now, whatever its environment."""
    children: dict[int, list[Proc]] = {}
    for p in processes():
        if p.state not in ("Z", "X"):
            children.setdefault(p.ppid, []).append(p)
    found, todo = set(), [root]
    while todo:
        for p in children.get(todo.pop(), []):
            found.add((p.pid, p.start))
            todo.append(p.pid)
    return found


def still_alive(procs: set[tuple[int, int]]) -> list[str]:
    """Those of `procs` (pid, start) that are alive, as 'pid [state] cmdline'."""
    return [f"{p.pid} [{p.state}] {p.cmdline[:160]}" for p in processes()
            if (p.pid, p.start) in procs and p.state not in ("Z", "X")]


def snapshot() -> set[tuple[int, int]]:
    """(pid, start) of every process alive now: what a test must not blame on its run."""
    return {(p.pid, p.start) for p in processes()}


def leftovers(before: set[tuple[int, int]], env_marker: str, needles: tuple[str, ...] = ()
              ) -> list[str]:
    """Processes started since `before` that belong to our run and are still alive.

    Ours: the environment holds `env_marker` (a `NAME=value` line every child of the run
    inherits, Ray's raylet/gcs_server and workers included) or the command line holds one of
    `needles` (e.g. the run directory). Zombies are dead already and not counted. Other Ray
    clusters on the machine (tests of other packages running in parallel) do not carry the
    marker, so they are not blamed on this run.
    """
    found = []
    for p in processes():
        if (p.pid, p.start) in before or p.pid == os.getpid() or p.state in ("Z", "X"):
            continue
        ours = env_marker in p.environ.splitlines() or any(n in p.cmdline for n in needles)
        if ours:
            found.append(f"{p.pid} [{p.state}] {p.cmdline[:160]}")
    return found
