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
