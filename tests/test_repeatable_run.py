"""The same config and seed give the same versions, run after run.

Flower draws node ids at random for every run and hands replies over as they arrive; a run
repeated by a hospital's auditor must still publish the same models. Runs the real ServerApp
and ClientApp code in this process (no Ray) on the heart hospitals, with a Grid that draws
node ids and reply order the way the runtime may.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.client_app import make_client_app
from server.federation import run_federation
from server.secagg import run_secagg
from tests.conftest import HEART
from tests.flower_helpers import RUN_ID, task_identity
from tests.inprocess_grid import InProcessGrid, run_settings, server_context

FAST = ("federation.rounds=3", "federation.local.steps=3", "federation.adaptation.enabled=false")


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


class ShuffledGrid(InProcessGrid):
    """Fresh random node ids, nodes listed and replies returned in a random order."""

    def __init__(self, app: ClientApp, num_nodes: int, seed: int) -> None:
        super().__init__(app, num_nodes)
        self.rng = random.Random(seed)  # not the global one: the strategy samples with that
        ids = self.rng.sample(range(1, 2**40), num_nodes)
        self.contexts = {
            node: Context(run_id=RUN_ID, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": i, "num-partitions": num_nodes})
            for i, node in enumerate(ids)
        }

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        nodes = list(self.contexts)
        self.rng.shuffle(nodes)
        return nodes

    def send_and_receive(self, messages: Iterable[Message], *,  # noqa: D102
                         timeout: float | None = None) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.rng.shuffle(replies)
        return replies


def _versions(run: Path) -> dict[str, str]:
    """Each published version's head file hash (the manifest's, signed)."""
    registry = run / "registry"
    return {v.name: json.loads((v / "manifest.json").read_text())["files"]["head.safetensors"]
            for v in sorted(registry.glob("v*"))}


def _run(tmp: Path, bundle: Path, keys: Path, grid_seed: int, *overrides: str
         ) -> tuple[dict[str, str], list[list[str]]]:
    run = tmp / f"run{grid_seed}"
    settings = run_settings(HEART, (*FAST, *overrides), run, bundle, keys)
    grid = ShuffledGrid(make_client_app(settings), 4, grid_seed)
    if "federation.privacy.secure_aggregation=true" in overrides:
        run_secagg(grid, server_context(), settings)
    else:
        run_federation(grid, settings)
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    trained = [sorted(e["site"] for e in audit if e["type"] == "train" and e["round"] == r)
               for r in (1, 2, 3)]
    return _versions(run), trained


@pytest.mark.parametrize("case", ["all", "half", "secagg"])
def test_a_repeated_run_publishes_the_same_versions(tmp_path, heart_bundle, signing_key_path,
                                                   case) -> None:
    extra = {"all": (), "half": ("federation.strategy.fraction_train=0.5",
                                 "federation.strategy.min_nodes=2"),
             # SecAgg+ masks each update with fresh random numbers; they cancel exactly in
             # the server's modular sum, so the published mean must not depend on them
             "secagg": ("federation.privacy.secure_aggregation=true",)}[case]
    first, first_sites = _run(tmp_path, heart_bundle, signing_key_path, 1, *extra)
    second, second_sites = _run(tmp_path, heart_bundle, signing_key_path, 2, *extra)
    assert len(first) == 4  # round 0's model and three rounds
    assert second == first
    assert second_sites == first_sites
    if case == "half":
        assert all(len(sites) == 2 for sites in first_sites)
