"""SIMULATION ONLY: make chosen simulated hospitals misbehave (`federation.faults`).

Used by the robustness tests and benchmarks: hospitals that send scaled or sign-flipped
updates, that fail, that answer late, or that vanish. A deployed hospital (no partition-id)
is never affected, whatever the run config says.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common.config import FaultsConfig


def chosen(fraction: float, num_nodes: int, seed: int) -> set[int]:
    """Partition ids of the misbehaving hospitals: round(fraction x N) of them, seeded."""
    count = int(round(fraction * num_nodes))
    order = np.random.default_rng(seed).permutation(num_nodes)
    return {int(i) for i in order[:count]}


class SimulatedFailure(RuntimeError):
    """Raised by a simulated hospital configured to fail."""


def maybe_fail(cfg: FaultsConfig, partition_id: int | None, num_nodes: int,
               server_round: int) -> None:
    """Fail, hang or vanish if this simulated hospital is one of this round's failing ones.

    Dropouts are intermittent, as in real networks: a new set fails each round.
    """
    if partition_id is None or cfg.fail_fraction <= 0:
        return
    failing = chosen(cfg.fail_fraction, num_nodes, cfg.seed * 100_003 + server_round)
    if partition_id not in failing:
        return
    mode = cfg.fail_mode
    if mode == "mixed":  # the failing hospitals take turns: raise, hang, vanish
        mode = ("raise", "hang", "vanish")[sorted(failing).index(partition_id) % 3]
    if mode == "raise":
        raise SimulatedFailure("simulated hospital failure (federation.faults.fail_mode=raise)")
    if mode == "hang":
        time.sleep(cfg.hang_seconds)  # answers, but late
        return
    if mode == "vanish":
        time.sleep(cfg.hang_seconds)
        raise SimulatedFailure("simulated hospital vanished (federation.faults.fail_mode=vanish)")
    raise ValueError("config key 'federation.faults.fail_mode' must be raise, hang, vanish or "
                     f"mixed, got '{cfg.fail_mode}'")


def maybe_poison(cfg: FaultsConfig, partition_id: int | None, num_nodes: int,
                 sent: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """Replace an honest update by a scaled or sign-flipped one for byzantine hospitals."""
    if partition_id is None or cfg.byzantine_fraction <= 0:
        return trained
    # a different seed than failures, so the two sets are drawn independently
    if partition_id not in chosen(cfg.byzantine_fraction, num_nodes, cfg.seed + 1):
        return trained
    if cfg.byzantine_mode == "scale":
        factor = cfg.byzantine_scale
    elif cfg.byzantine_mode == "signflip":
        factor = -1.0
    else:
        raise ValueError("config key 'federation.faults.byzantine_mode' must be scale or "
                         f"signflip, got '{cfg.byzantine_mode}'")
    return {n: sent[n] + factor * (trained[n] - sent[n]) for n in trained}
