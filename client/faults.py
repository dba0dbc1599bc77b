"""Test scaffolding: make chosen hospitals misbehave (`federation.faults`).

Used by the robustness tests and benchmarks: simulated hospitals that send scaled or
sign-flipped updates, that fail, answer late or vanish, and malicious ones (`attack`) that
lie about their size, send huge or NaN updates, spoof a name or send malformed replies, so
that each defence of the server is exercised by the real runtime. Run config alone never
affects a deployed hospital (no partition-id); a deployed test hospital misbehaves only
when its own node config says `attack=...` (a hospital that changed its own client).
Everything here is a no-op unless configured, and only :func:`tamper` touches replies.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import records as rk
from common.config import FaultsConfig
from common.config_check import ATTACKS


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


def attack_of(cfg: FaultsConfig, partition_id: int | None, num_nodes: int,
              node_attack: str | None = None) -> str | None:
    """The attack this hospital carries out, or None.

    A deployed hospital attacks only when its own node config names an attack; a simulated
    one when it is among the `attack_fraction` chosen (with `mixed`, they take turns).
    """
    if node_attack:
        return node_attack
    if partition_id is None or cfg.attack == "none" or cfg.attack_fraction <= 0:
        return None
    attackers = sorted(chosen(cfg.attack_fraction, num_nodes, cfg.seed + 2))
    if partition_id not in attackers:
        return None
    if cfg.attack == "mixed":
        return ATTACKS[attackers.index(partition_id) % len(ATTACKS)]
    return cfg.attack


def tamper(attack: str | None, kind: str, content: RecordDict, value: float,
           other_name: Callable[[], str]) -> RecordDict:
    """The reply a malicious hospital sends instead of `content` (`kind`: the message type).

    `other_name` is asked only by `spoof-name`: naming another simulated hospital reads the
    whole federation's data, which no other attack needs (a deployed attacker paid it per
    message)."""
    if attack is None:
        return content
    metrics = content.metric_records.get(rk.METRICS)
    arrays = content.array_records.get(rk.ARRAYS)
    out = RecordDict(dict(content.items()))
    if attack == "malformed":
        out.pop(rk.ARRAYS if arrays is not None else rk.METRICS, None)
        return out
    if attack == "spoof-name" and rk.SITE in content.config_records:
        out[rk.SITE] = ConfigRecord({rk.SITE_NAME: other_name()})
    if metrics is not None and attack in ("inflate-count", "omit-count"):
        counts = (rk.NUM_TRAIN, rk.NUM_EXAMPLES) if kind != "evaluate" else ()
        kept = {k: v for k, v in metrics.items()
                if not (attack == "omit-count" and k in counts)}
        if attack == "inflate-count":
            kept.update({k: value for k in counts if k in metrics})
        out[rk.METRICS] = MetricRecord(kept)  # type: ignore[arg-type]
    if arrays is not None and attack in ("huge-update", "nan-update"):
        tensors = arrays.to_torch_state_dict()
        bad = {n: (t + value if attack == "huge-update" else torch.full_like(t, float("nan")))
               for n, t in tensors.items()}
        out[rk.ARRAYS] = ArrayRecord(bad)
    return out
