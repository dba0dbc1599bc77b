"""A Flower Grid that hands every call to an inner Grid; subclasses override what they add."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid import HttpGrid

# Flower's deployment Grid (flwr 1.42 `superlink/grid/http_grid.py::HttpGrid.send_and_receive`)
# sleeps 3 s between two pulls of replies, so every exchange waits 1.5 s on average after its
# last reply came in. The pull is a call to the SuperLink on the ServerApp's own host: four a
# second cost nothing measurable. Other Grids (the simulation's in-memory one pulls every 0.1 s,
# the tests' in-process one) keep their own send_and_receive.
REPLY_POLL_S = 0.25


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float | None
                     ) -> list[Message]:
    """`grid.send_and_receive`; on Flower's deployment Grid the same push, then pulls until
    every reply is in or `timeout` passed, :data:`REPLY_POLL_S` apart instead of 3 s."""
    if not isinstance(grid, HttpGrid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    end = time.time() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    while timeout is None or time.time() < end:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting:
            break
        time.sleep(REPLY_POLL_S)
    return replies


class DelegatingGrid(Grid):
    """Plain delegation to `self.inner` (set by the subclass)."""

    inner: Grid

    def set_run(self, run: Run) -> None:  # noqa: D102
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.inner.run

    def create_message(  # noqa: D102
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(  # noqa: D102
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)
