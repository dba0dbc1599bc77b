"""Simulated misbehaviour (`federation.faults`): who misbehaves and what they send."""

from __future__ import annotations

import pytest
import torch

from client.faults import SimulatedFailure, chosen, maybe_fail, maybe_poison
from common.config import FaultsConfig

SENT = {"head.weight": torch.zeros(2, 3), "head.bias": torch.ones(2)}
TRAINED = {"head.weight": torch.full((2, 3), 0.5), "head.bias": torch.full((2,), 1.5)}


def _byzantine_id(cfg: FaultsConfig, n: int) -> int:
    return min(chosen(cfg.byzantine_fraction, n, cfg.seed + 1))


def test_chosen_is_seeded_and_sized() -> None:
    assert chosen(0.2, 10, 3) == chosen(0.2, 10, 3)
    assert len(chosen(0.3, 10, 3)) == 3
    assert chosen(0.0, 10, 3) == set()


@pytest.mark.parametrize(("mode", "factor"), [("scale", 100.0), ("signflip", -1.0)])
def test_byzantine_hospital_sends_a_scaled_or_flipped_update(mode: str, factor: float) -> None:
    cfg = FaultsConfig(byzantine_fraction=0.2, byzantine_mode=mode)
    pid = _byzantine_id(cfg, 10)
    out = maybe_poison(cfg, pid, 10, SENT, TRAINED)
    for name in SENT:
        assert torch.allclose(out[name] - SENT[name], factor * (TRAINED[name] - SENT[name]))


def test_honest_and_deployed_hospitals_are_untouched() -> None:
    cfg = FaultsConfig(byzantine_fraction=0.2, fail_fraction=1.0)
    honest = next(i for i in range(10) if i not in chosen(0.2, 10, cfg.seed + 1))
    assert maybe_poison(cfg, honest, 10, SENT, TRAINED) is TRAINED
    assert maybe_poison(cfg, None, 10, SENT, TRAINED) is TRAINED  # deployment: never
    maybe_fail(cfg, None, 10, server_round=1)  # deployment: never fails


def test_failing_set_changes_from_round_to_round() -> None:
    cfg = FaultsConfig(fail_fraction=0.3, fail_mode="raise")
    failing = [frozenset(chosen(0.3, 10, cfg.seed * 100_003 + r)) for r in range(1, 6)]
    assert len(set(failing)) > 1
    pid = min(failing[0])
    with pytest.raises(SimulatedFailure):
        maybe_fail(cfg, pid, 10, server_round=1)
