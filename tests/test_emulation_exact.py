"""The benchmarks' in-process emulation publishes what the product publishes, bit for bit.

benchmarks/emulate.py replays a `medfed simulate` run with the product's functions so the
quality tables can afford many seeds. Its figures are only the product's figures if every
version it computes is the very tensor the server publishes: a difference of 1e-7 per round
(float64 averaging against Flower's float32) changed which version a 160-round BreastMNIST
run kept. Runs the real ServerApp and ClientApp code in this process (no Ray) and the
emulation on the same config, bundle and seed, and compares every version.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from benchmarks import emulate
from client.client_app import make_client_app
from common.config_check import load_config
from common.data.federated import load_federated
from server.federation import run_federation
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings

ROUNDS = 4
RUN = (f"federation.rounds={ROUNDS}", "federation.local.steps=5",
       "federation.adaptation.enabled=false", "federation.strategy.min_nodes=4")


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def _published(run: Path) -> list[dict[str, np.ndarray]]:
    """Every version's tensors, as the registry holds them (round 0 first)."""
    out = []
    for version in sorted((run / "registry").glob("v*")):
        tensors: dict[str, np.ndarray] = {}
        for name in ("backbone.safetensors", "head.safetensors"):
            tensors.update(load_file(version / name))
        out.append(tensors)
    return out


@pytest.mark.parametrize("extra", [(), ("federation.strategy.name=fedyogi",
                                        "federation.strategy.eta=0.05")],
                         ids=["fedavg", "fedyogi"])
def test_every_emulated_version_is_the_published_one(tmp_path, heart_bundle, signing_key_path,
                                                     monkeypatch, extra) -> None:
    overrides = (*RUN, *extra)
    settings = run_settings(HEART, overrides, tmp_path / "run", heart_bundle, signing_key_path)
    run_federation(InProcessGrid(make_client_app(settings), 4), settings)
    published = _published(tmp_path / "run")
    assert len(published) == ROUNDS + 1

    emulated: list[dict[str, torch.Tensor]] = []
    aggregate = emulate.Aggregator.__call__

    def keep(self, current, replies):  # type: ignore[no-untyped-def]
        new = aggregate(self, current, replies)
        emulated.append(new)
        return new

    monkeypatch.setattr(emulate.Aggregator, "__call__", keep)
    cfg = load_config(HEART, list(overrides))
    model, stats = emulate.start_model(cfg, heart_bundle, signing_key_path)
    out = emulate.federate(cfg, model, load_federated(cfg.federation.data, stats, seed=cfg.seed),
                           personalise=False)

    assert len(emulated) == ROUNDS
    for rnd, tensors in enumerate(emulated, start=1):
        for name, value in tensors.items():
            # the registry stores the model's float32 tensors
            np.testing.assert_array_equal(value.float().numpy(), published[rnd][name],
                                          err_msg=f"round {rnd}, tensor {name}")
    best = json.loads((tmp_path / "run" / "registry" / "best.json").read_text())
    assert out["version"] == best["version"]
