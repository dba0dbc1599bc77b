"""The hospital's own log: one JSON line per event in `<workdir>/events.jsonl`, and the same
event as one timestamped sentence on the hospital's terminal.

The ClientApp (a fresh Flower process per message) appends what it did: backbone received
and verified, each round's local training and validation, the model and site model it kept,
errors. `medfed client` appends join, registration and connection events, follows the file
and prints every line with :func:`describe`. Lines are small and written with one `write`
on an O_APPEND file, so writers in several processes do not interleave.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.follow import TailReader
from common.names import printable

EVENTS_FILE = "events.jsonl"
MAX_FIELD = 2000  # characters of one text field kept: an error may quote the server's text


def emit(workdir: Path | None, event: str, **fields: Any) -> None:
    """Append one event to `<workdir>/events.jsonl`; a node without a workdir logs nothing."""
    if workdir is None:
        return
    record = {"time": datetime.now(UTC).isoformat(timespec="seconds"),
              "event": event, **{k: _plain(v) for k, v in fields.items()}}
    line = (json.dumps(record, sort_keys=False) + "\n").encode("utf-8")
    path = workdir / EVENTS_FILE
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # the first event of a new node: one mkdir, not one each
            workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass  # the log must never cost the hospital its round


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + "…"  # one line stays one small write (see the module notes)
    return value


def _shown(value: Any) -> Any:
    """A field as the terminal shows it: text without control characters, capped (error
    messages quote what the server sent); numbers and flags as they are."""
    if value is None or isinstance(value, bool | int | float):
        return value
    return printable(value)


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def describe(record: dict[str, Any]) -> str:
    """One sentence for an event, as the hospital's terminal shows it."""
    r = {k: _shown(v) for k, v in record.items()}
    e = r.get("event", "?")
    if e == "start":
        return (f"starting hospital {r.get('name')}: server {r.get('server')}, data "
                f"{r.get('data')}, local port {r.get('port')}, {r.get('mode')}")
    if e == "data-ok":
        return f"data checked against {r.get('model')}: {r.get('summary')}"
    if e == "joined":
        return f"joined the federation as node {r.get('node_id')}"
    if e == "waiting":
        return str(r.get("message"))
    if e == "backbone":
        how = "received and verified" if r.get("received") else "verified from the local cache"
        return (f"backbone {str(r.get('sha256'))[:12]} {how} (signed manifest); rows: train "
                f"{r.get('train')}, validation {r.get('validation')}, test {r.get('test')}")
    if e == "train":
        return (f"round {r.get('round')}: trained on {r.get('rows')} local rows, "
                f"{r.get('steps')} steps, loss {_num(r.get('loss'), 4)}")
    if e == "evaluate":
        return (f"round {r.get('round')}: local validation ({r.get('rows')} rows) AUC "
                f"{_num(r.get('auc'))}, balanced accuracy {_num(r.get('balanced_accuracy'))}")
    if e == "site-model":
        return (f"site model staged: kept the {r.get('kept')} model ({r.get('reason')}); "
                f"local validation balanced accuracy {_num(r.get('balanced_accuracy'))}")
    if e == "site-model-saved":
        return f"site model signed and saved in {r.get('path')}"
    if e == "model":
        return f"model v{int(r.get('version', 0)):04d} delivered and verified: {r.get('path')}"
    if e == "error":
        return f"error: {r.get('message')}"
    if e == "stopped":
        return f"stopped: {r.get('message')}"
    return printable(json.dumps(record))


def line(record: dict[str, Any]) -> str:
    """`2026-12-02 08:00:01 hospital-a: <sentence>` in local time."""
    try:
        when = datetime.fromisoformat(str(record["time"])).astimezone()
        stamp = when.strftime("%Y-%m-%d %H:%M:%S")
    except (KeyError, ValueError):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    who = printable(record.get("site") or record.get("name") or "", 64)
    return f"{stamp} {who + ': ' if who else ''}{describe(record)}"


class Follower:
    """Reads the events appended to a file since it was created (by any process)."""

    def __init__(self, path: Path) -> None:
        self._tail = TailReader(path)

    def new(self) -> list[dict[str, Any]]:
        """Events written since the last call; a half-written last line waits for the rest."""
        out = []
        for raw in self._tail.lines():
            try:
                value = json.loads(raw)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out
