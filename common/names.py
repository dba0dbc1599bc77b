"""Names that come from another party (a hospital's site name, a CSV file stem), made safe.

A name is used in log lines, file names and tables: letters, digits and `_.-` only, at most
64 characters, never starting with a dot. Anything else (newlines, escape sequences, slashes)
becomes `_`, so a name cannot fake a log line, move a path, or hide another site.
"""

from __future__ import annotations

import re

MAX_NAME = 64
_NAME_OK = re.compile(r"[A-Za-z0-9_.-]")


def sanitise_name(text: object) -> str:
    """The safe form of `text` (see the module notes); `unnamed` when nothing is left."""
    raw = str(text)[:MAX_NAME]
    cleaned = "".join(c if _NAME_OK.fullmatch(c) else "_" for c in raw).lstrip(".")
    return cleaned or "unnamed"


MAX_TEXT = 300  # characters of another party's text that reach our terminal or log


def printable(text: object, limit: int = MAX_TEXT) -> str:
    """Another party's text for a terminal or log: no control characters (no escape
    sequences that could fake an "ok" line), at most `limit` characters."""
    raw = str(text)
    cleaned = "".join(c if c.isprintable() else "?" for c in raw[:limit])
    return cleaned + ("…" if len(raw) > limit else "")
