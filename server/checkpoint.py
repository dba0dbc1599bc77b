"""Server state after every completed round, for `--resume` after a crash.

The registry version of round R is the global model; this adds what the strategy keeps
between rounds (FedAdam/FedYogi/FedAdagrad moments) and the round number. The checkpoint is
written last, atomically: it is the commit point of a round. A registry version newer than the
checkpoint belongs to an uncommitted round and is removed on resume; that round is then run
again with the same seeds, so no completed round is lost and none appears twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_dir
from common.bundle import state_from_bytes, state_to_bytes

# strategy attributes that carry state across rounds (Flower's FedOpt family)
STATE_ATTRS = ("m_t", "v_t")


@dataclass(frozen=True)
class Checkpoint:
    """The last committed round and the strategy's state at that point."""

    round: int
    strategy: str
    state: dict[str, dict[str, np.ndarray]]
    # the settings the committed versions were made under, flat (`federation.privacy.dp`:
    # ...), less those a resume may change; None: written before they were recorded
    settings: dict[str, Any] | None = None


def strategy_state(strategy: Any) -> dict[str, torch.Tensor]:
    """A copy of what the strategy keeps between rounds, as it is now."""
    tensors: dict[str, torch.Tensor] = {}
    for attr in STATE_ATTRS:
        value = getattr(strategy, attr, None)
        for name, arr in (value or {}).items():
            tensors[f"{attr}/{name}"] = torch.from_numpy(np.array(arr, order="C", copy=True))
    return tensors


def save_checkpoint(run_dir: Path, server_round: int, strategy_name: str,
                    tensors: dict[str, torch.Tensor],
                    settings: dict[str, Any] | None = None) -> None:
    """Commit round `server_round` with the strategy state of that round (from
    :func:`strategy_state`) and the settings its versions were made under: an
    atomic replace of `<run_dir>/checkpoint/`."""
    meta = {"round": server_round, "strategy": strategy_name, "attrs": list(STATE_ATTRS),
            "settings": settings}
    with atomic_dir(run_dir / "checkpoint", replace=True) as tmp:
        (tmp / "strategy.safetensors").write_bytes(state_to_bytes(tensors))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The committed state, or None if no round was committed."""
    folder = run_dir / "checkpoint"
    if not (folder / "state.json").exists():
        # killed between atomic_dir's two renames: the last commit waits under its old name
        # (without this, a resume found no checkpoint and dropped every version)
        aside = [(json.loads(f.read_text(encoding="utf-8")).get("round", -1), f.parent)
                 for f in run_dir.glob(".checkpoint.old-*/state.json")]
        if not aside:
            return None
        folder = max(aside, key=lambda pair: (int(pair[0]), str(pair[1])))[1]
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    tensors = state_from_bytes((folder / "strategy.safetensors").read_bytes(),
                               str(folder / "strategy.safetensors"))
    state: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        attr, name = key.split("/", 1)
        state.setdefault(attr, {})[name] = tensor.numpy()
    settings = meta.get("settings")
    return Checkpoint(int(meta["round"]), str(meta["strategy"]), state,
                      settings if isinstance(settings, dict) else None)


def restore_strategy(strategy: Any, checkpoint: Checkpoint) -> None:
    """Put the saved moments back into a freshly built strategy."""
    for attr, arrays in checkpoint.state.items():
        if hasattr(strategy, attr):
            setattr(strategy, attr, {k: v.copy() for k, v in arrays.items()})


def count_rounds_from(strategy: Any, offset: int) -> None:
    """Give the strategy's aggregation the federation's round number after a resume.

    A resumed start counts its rounds from 1 again, and Flower's FedAdam corrects the bias of
    its restored moments by that number (fedadam.py, `aggregate_train`): without the offset a
    resumed run would not continue the uninterrupted one.
    """
    if offset == 0:
        return
    aggregate = strategy.aggregate_train

    def aggregate_train(server_round: int, replies: Any) -> Any:
        return aggregate(server_round + offset, replies)

    strategy.aggregate_train = aggregate_train


def drop_uncommitted_versions(registry_root: Path, committed: int) -> list[int]:
    """Remove registry versions newer than the committed round; returns their numbers."""
    removed: list[int] = []
    if not registry_root.is_dir():
        return removed
    for child in registry_root.iterdir():
        number = child.name[1:]
        if child.name.startswith("v") and number.isdigit() and int(number) > committed:
            shutil.rmtree(child)
            removed.append(int(number))
    return sorted(removed)
