"""The watchdog of one :class:`~common.processes.ProcessGroup`: `python -m common.watchdog
TOKEN [PID_FILE]`.

It reads its standard input, a pipe from the medfed process that started it. "exit" means
that process stopped everything itself; end of input without it means that process died (even
by SIGKILL, which no handler sees), and the watchdog stops every process carrying the marker.
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


def main(argv: list[str]) -> int:
    """Wait for "exit" or end of input; sweep on the latter."""
    token = argv[0]
    owner = os.getppid()
    pid_file = Path(argv[1]) if len(argv) > 1 and argv[1] else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe decides
    listed: list[int] = []
    buffer = b""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], REFRESH_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 4096)
            if not chunk:
                break  # the parent is gone without saying so
            buffer += chunk
            if b"exit" in buffer:
                return 0
        if pid_file is not None and pid_file.parent.exists():
            pids = sorted(marked_pids(token))
            if pids and pids != listed:
                write_pid_file(pid_file, token, owner, pids)
                listed = pids
    sweep(token)
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
