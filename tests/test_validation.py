"""Reply validation before aggregation: what is excluded, and why."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common import records as rk
from server.validation import validate_train_replies
from tests.flower_helpers import task_identity

SENT = {"head.weight": np.zeros((2, 4), np.float32), "head.bias": np.zeros(2, np.float32)}


def reply(node: int, arrays: dict[str, np.ndarray], n: float = 10) -> Message:
    with task_identity(node_id=0):
        out = Message(RecordDict({rk.ARRAYS: ArrayRecord({k: Array(v) for k, v in SENT.items()})}),
                      dst_node_id=node, message_type="train")
    content = RecordDict({rk.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          rk.METRICS: MetricRecord({rk.NUM_EXAMPLES: n})})
    with task_identity(node_id=node):
        return Message(content, reply_to=out)


def honest(scale: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in SENT.items()}


def reasons(replies: list[Message], declared: dict[int, int] | None = None,
            ratio: float = 10.0) -> dict[int, str | None]:
    return {v.node_id: v.reason
            for v in validate_train_replies(SENT, replies, declared or {}, ratio)}


def test_honest_replies_pass() -> None:
    replies = [reply(i, honest(seed=i)) for i in range(1, 5)]
    assert set(reasons(replies).values()) == {None}


def test_scaled_update_is_excluded_by_the_norm_bound() -> None:
    replies = [reply(i, honest(seed=i)) for i in range(1, 5)]
    replies.append(reply(9, {k: 100 * v for k, v in honest(seed=9).items()}))
    got = reasons(replies)
    assert got[9] is not None and "exceeds 10 x the round median" in got[9]
    assert all(got[i] is None for i in range(1, 5))


def test_norm_bound_off_keeps_scaled_update() -> None:
    replies = [reply(i, honest(seed=i)) for i in range(1, 5)]
    replies.append(reply(9, {k: 100 * v for k, v in honest(seed=9).items()}))
    assert reasons(replies, ratio=0)[9] is None


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"head.weight": np.zeros((2, 4), np.float32)}, "missing ['head.bias']"),
        ({**SENT, "backbone.0.weight": np.zeros(3, np.float32)},
         "unexpected ['backbone.0.weight']"),
        ({**SENT, "head.bias": np.zeros(3, np.float32)}, "has shape (3,), expected (2,)"),
        ({**SENT, "head.bias": np.array([np.nan, 0], np.float32)}, "NaN or infinite"),
        ({**SENT, "head.bias": np.zeros(2, np.int64)}, "expected a float dtype"),
    ],
)
def test_malformed_tensors_are_excluded(arrays: dict[str, np.ndarray], expected: str) -> None:
    assert expected in str(reasons([reply(3, arrays)])[3])


@pytest.mark.parametrize(("n", "expected"), [(0, "expected > 0"), (-4, "expected > 0"),
                                              (51, "above the 50 training rows")])
def test_bad_example_counts_are_excluded(n: float, expected: str) -> None:
    assert expected in str(reasons([reply(3, honest(), n=n)], declared={3: 50})[3])


def test_count_at_the_declared_size_passes() -> None:
    assert reasons([reply(3, honest(), n=50)], declared={3: 50})[3] is None
