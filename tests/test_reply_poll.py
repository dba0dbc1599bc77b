"""The ServerApp's exchange with hospitals in deployment: the same replies as Flower's Grid,
pulled REPLY_POLL_S apart instead of Flower's 3 s (server/delegating_grid.py)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.superlink.grid import HttpGrid

from server import delegating_grid
from server.delegating_grid import REPLY_POLL_S, send_and_receive
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid


class ScriptedHttpGrid(HttpGrid):
    """Flower's deployment Grid without a SuperLink: replies arrive on the pulls given."""

    def __init__(self, arrivals: dict[int, list[str]]) -> None:  # no connection is made
        self.arrivals = arrivals  # pull number -> ids of the messages answered by then
        self.pulls = 0
        self.pushed: list[str] = []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        out = []
        for mid in self.arrivals.get(self.pulls, []):
            assert mid in wanted, f"{mid} pulled twice"
            reply = Message(RecordDict({"metrics": MetricRecord({"n": 1})}),
                            dst_node_id=1, message_type="train")
            reply.metadata.__dict__["_reply_to_message_id"] = mid  # read-only in Flower
            out.append(reply)
        return out


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(delegating_grid.time, "sleep", slept.append)
    return slept


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=i + 1, message_type="train") for i in range(n)]


def test_every_reply_is_collected_with_short_pauses(pauses: list[float]) -> None:
    grid = ScriptedHttpGrid({1: ["m1"], 4: ["m0", "m2"]})
    with task_identity():
        replies = send_and_receive(grid, _messages(3), timeout=60.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 4  # stops at the pull that brought the last reply
    assert pauses == [REPLY_POLL_S] * 3 and REPLY_POLL_S < 3


def test_a_timeout_returns_the_replies_that_came(pauses: list[float],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))  # each look at the clock: 10 s later
    monkeypatch.setattr(delegating_grid.time, "time", lambda: float(next(clock)))
    grid = ScriptedHttpGrid({1: ["m0"]})
    with task_identity():
        replies = send_and_receive(grid, _messages(2), timeout=25.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.pulls == 2


def test_other_grids_keep_their_own_exchange(pauses: list[float]) -> None:
    from client.client_app import make_client_app

    grid = InProcessGrid(make_client_app(), 2)
    with task_identity():
        assert send_and_receive(grid, [], timeout=1.0) == []
    assert pauses == []
