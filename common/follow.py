"""Read what other processes append to a log file, whole lines only."""

from __future__ import annotations

from pathlib import Path


class TailReader:
    """The lines appended to `path` since this reader was made; a half-written last line
    waits for its end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def lines(self) -> list[bytes]:
        """Complete lines written since the last call (without their newline)."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return []
        self.offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return complete
