"""Secure aggregation (Flower SecAgg+ on the legacy workflow): correct mean, masked uploads.

One round of `run_secagg` on the heart config (4 hospitals) runs in this process through
`tests/inprocess_grid.py`: the real ServerApp and ClientApp code, every reply the server
receives recorded. The expected updates come from `client/node.py` `train`, called outside
Flower with the same node settings and seeds. The slow test runs `medfed simulate`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from safetensors.numpy import load_file

from client import node as ops
from client.client_app import make_client_app
from common.bundle import load_bundle
from common.config import ConfigError, PrivacyConfig
from common.settings import NodeSettings, RunSettings
from server.federation import load_payload
from server.secagg import run_secagg
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings, server_context
from tests.limits import RUN_S

SITES = 4
ONE_ROUND = ("federation.rounds=1", "federation.adaptation.enabled=false",
             "federation.privacy.secure_aggregation=true")


@dataclass(frozen=True)
class SecAggRun:
    """A finished one-round SecAgg+ run and what each hospital really computed."""

    run_dir: Path
    grid: InProcessGrid
    names: list[str]  # trainable tensors, in message order
    updates: list[np.ndarray]  # per hospital: trained tensors, flattened in `names` order
    weights: list[int]  # per hospital: num_examples


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory: pytest.TempPathFactory, heart_bundle: Path,
               signing_key_path: Path) -> Iterator[SecAggRun]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is ~3x faster on 2 CPUs
    try:
        with task_identity():
            settings = run_settings(HEART, ONE_ROUND, tmp_path_factory.mktemp("secagg") / "run",
                                    heart_bundle, signing_key_path)
            grid = InProcessGrid(make_client_app(settings), SITES)
            run_secagg(grid, server_context(), settings)
            names, updates, weights = _true_updates(settings, heart_bundle)
        yield SecAggRun(settings.run_dir, grid, names, updates, weights)
    finally:
        torch.set_num_threads(threads)


def _true_updates(settings: RunSettings, heart_bundle: Path
                  ) -> tuple[list[str], list[np.ndarray], list[int]]:
    """Round 1 of each hospital, recomputed outside Flower (same node dirs, same seeds)."""
    head = load_bundle(heart_bundle).head
    sha = load_payload(heart_bundle).sha256
    cfg = settings.load_config()
    updates, weights, names = [], [], []
    for i in range(SITES):
        node_cfg = {"partition-id": i, "num-partitions": SITES}
        node = ops.Node(cfg, settings, NodeSettings.from_node_config(node_cfg, settings))
        tensors, result, _ = ops.train(node, {k: v.clone() for k, v in head.items()}, sha, 1,
                                       0.0)
        names = list(tensors)
        updates.append(np.concatenate([tensors[n].numpy().ravel() for n in names]))
        weights.append(result.num_examples)
    return names, updates, weights


def _published(run: SecAggRun, version: int) -> np.ndarray:
    tensors = load_file(run.run_dir / "registry" / f"v{version:04d}" / "head.safetensors")
    return np.concatenate([tensors[n].ravel() for n in run.names])


def test_secure_aggregate_equals_fedavg_within_quantisation(secagg_run: SecAggRun) -> None:
    """SecAgg+ uploads num_examples/max_weight * params, stochastically rounded to steps of
    2 * clipping_range / quantization_range, and divides the unmasked sum by the summed
    weights: FedAvg weighted by num-examples, each hospital off by less than one step."""
    pc = PrivacyConfig()
    weights = np.array(secagg_run.weights, dtype=float)
    expected = np.average(np.stack(secagg_run.updates), axis=0, weights=weights)
    step = 2 * pc.secagg_clipping_range / pc.secagg_quantization_range
    ratios = weights / weights.max()  # run_secagg uses the largest hospital as max_weight
    tolerance = SITES * step / ratios.sum() + 1e-6  # + float32 rounding of the head
    got = _published(secagg_run, 1)
    assert np.max(np.abs(got - expected)) < tolerance
    # the tolerance is tight enough to tell weighted from unweighted averaging
    unweighted = np.mean(np.stack(secagg_run.updates), axis=0)
    assert np.max(np.abs(got - unweighted)) > 100 * tolerance


def test_server_never_receives_an_unmasked_update(secagg_run: SecAggRun) -> None:
    """What the server gets from a hospital in a SecAgg+ round: (1) its public keys,
    (2) key shares encrypted for other hospitals, (3) the masked vector
    q + private mask + pairwise masks (mod 2**32), where q is the quantised weighted update,
    and (4) in the unmask stage, shares of other hospitals' secrets: of each active
    hospital only shares of its private-mask seed, never of its pairwise key. So the server
    can remove the masks from the SUM only. Checked here on every reply the server received:
    no float tensor comes back, and no masked vector is close to any hospital's quantised
    update q (or to the update itself, read as Flower would dequantise it)."""
    pc = PrivacyConfig()
    weights = np.array(secagg_run.weights, dtype=float)
    quantiser = pc.secagg_quantization_range / (2 * pc.secagg_clipping_range)
    quantised = [np.floor((u * w / weights.max() + pc.secagg_clipping_range) * quantiser)
                 for u, w in zip(secagg_run.updates, weights, strict=True)]
    masked: list[np.ndarray] = []
    for reply in secagg_run.grid.received:
        assert not reply.has_error(), reply.error.reason
        for record in reply.content.array_records.values():
            assert len(record) == 0, "a reply carries tensors in clear"
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            masked.append(np.concatenate([a.ravel() for a in arrays[1:]]).astype(np.float64))
    assert len(masked) == SITES  # one masked upload per hospital, nothing else
    for vector in masked:
        as_update = vector / quantiser - pc.secagg_clipping_range
        for q, update in zip(quantised, secagg_run.updates, strict=True):
            assert np.mean(np.abs(vector - q) <= 2) < 0.05  # stochastic rounding: +-1
            assert np.max(np.abs(as_update - update)) > 1.0


def test_every_round_is_published_with_site_metrics(secagg_run: SecAggRun) -> None:
    summary = json.loads((secagg_run.run_dir / "summary.json").read_text(encoding="utf-8"))
    rounds = [json.loads(line) for line in
              (secagg_run.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["latest"]["version"] == 1
    assert summary["secure_aggregation"]["num_shares"] == PrivacyConfig().secagg_num_shares
    assert sorted(rounds[-1]["sites"]) == ["cleveland", "hungary", "switzerland", "va"]
    assert sorted(rounds[-1]["train"]) == ["cleveland", "hungary", "switzerland", "va"]


@pytest.mark.parametrize(("override", "key"), [
    ("federation.privacy.dp=server", "federation.privacy.dp"),
    ("federation.strategy.name=fedprox", "federation.strategy.name"),
    ("federation.privacy.secagg_num_shares=5", "federation.privacy.secagg_num_shares"),
])
def test_unsupported_settings_are_refused(tmp_path, heart_bundle, signing_key_path,
                                          override, key) -> None:
    with task_identity():
        settings = run_settings(HEART, (*ONE_ROUND, override), tmp_path / "run", heart_bundle,
                                signing_key_path)
        grid = InProcessGrid(make_client_app(settings), SITES)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            run_secagg(grid, server_context(), settings)
    assert grid.received == [] or all(
        r.metadata.message_type.startswith("query.") for r in grid.received)


@pytest.mark.slow
def test_simulate_with_secure_aggregation(tmp_path, heart_bundle, cli_env) -> None:
    out = tmp_path / "run"
    medfed = str(Path(sys.executable).parent / "medfed")
    proc = subprocess.run(
        [medfed, "simulate", "--config", str(HEART), "--bundle", str(heart_bundle),
         "--out", str(out), "--rounds", "2", "--set", "federation.privacy.secure_aggregation=true",
         "--set", "federation.adaptation.enabled=false"],
        env=cli_env, capture_output=True, text=True, timeout=RUN_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["latest"]["version"] == 2
    assert "secure_aggregation" in summary
    assert len(summary["sites"]) == SITES
