"""The watchdog of one :class:`~common.processes.ProcessGroup`: `python -m common.watchdog
TOKEN [PID_FILE]`.

It reads its standard input, a pipe from the medfed process that started it: "group PID" for
each child started in its own session, "exit" when that process stopped everything itself.
End of input without "exit" means that process died (even by SIGKILL, which no handler sees):
the watchdog then stops the children's process groups and every process carrying the marker.
Meanwhile it keeps PID_FILE listing every marked process, grandchildren included.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from pathlib import Path

from common.processes import marked_pids, sweep, write_pid_file

REFRESH_S = 1.0


def stop_groups(groups: set[int], sig: int) -> None:
    """Signal each process group in `groups` that still exists."""
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            continue


def main(argv: list[str]) -> int:
    """Wait for "exit" or end of input; stop the groups and sweep on the latter."""
    token = argv[0]
    owner = os.getppid()
    pid_file = Path(argv[1]) if len(argv) > 1 and argv[1] else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe decides
    listed: list[int] = []
    groups: set[int] = set()
    buffer = b""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], REFRESH_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                break  # the parent is gone without saying so
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line == b"exit":
                    return 0
                word, _, pid = line.partition(b" ")
                if word == b"group" and pid.isdigit() and int(pid) > 1:
                    groups.add(int(pid))
        if pid_file is not None and pid_file.parent.exists():
            pids = sorted(marked_pids(token))
            if pids and pids != listed:
                write_pid_file(pid_file, token, owner, pids)
                listed = pids
    groups.discard(os.getpgrp())
    stop_groups(groups, signal.SIGTERM)
    sweep(token)
    stop_groups(groups, signal.SIGKILL)  # what ignored SIGTERM in a group of ours
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
