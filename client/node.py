"""What a hospital node does with each message, as plain functions over `common/`.

The ClientApp handlers (`client/client_app.py`) only unpack messages and call these. Nothing
here puts patient values into a reply: replies hold trainable tensors, counts and scalar
metrics; error texts hold counts, shapes and names.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.cache import BackboneCache, FeatureCache
from client.faults import maybe_fail, maybe_poison
from client.local_data import fingerprint, hospital_normaliser, hospital_site, simulated_site
from client.predict import SITE_STATS
from common.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from common.bundle import load_bundle, state_from_bytes, state_to_bytes
from common.config import Config
from common.data.federated import SiteSplit
from common.data.schema import DataError
from common.device import resolve_device, seed_everything
from common.manifest import model_from_manifest
from common.models import (
    SplitModel,
    frozen_features,
    frozen_prefix_blocks,
    load_state,
    set_trainable,
)
from common.settings import NodeSettings, RunSettings
from common.signing import load_public_key
from common.training import TrainResult, evaluate, train_local


@dataclass
class Node:
    """One hospital node for the duration of one message."""

    cfg: Config
    run: RunSettings
    settings: NodeSettings

    @property
    def backbones(self) -> BackboneCache:
        """The node's backbone cache."""
        return BackboneCache(self.settings.workdir / "backbones", self.settings.signing_pub)

    @property
    def device(self) -> torch.device:
        """`device` from node config, else the experiment config."""
        return resolve_device(self.settings.device or self.cfg.device)

    def model(self, backbone_sha: str) -> tuple[SplitModel, dict[str, Any], list[str]]:
        """Model with the cached backbone; returns (model, manifest, trainable names)."""
        file_bytes, manifest = self.backbones.load(backbone_sha)
        model = model_from_manifest(manifest)
        load_state(model, state_from_bytes(file_bytes, "cached backbone"), where="cached backbone")
        names = set_trainable(model, self.cfg.model.trainable)
        return model, manifest, names

    def site(self, manifest: dict[str, Any]) -> SiteSplit:
        """This node's local split."""
        if self.settings.partition_id is not None:
            return simulated_site(self.cfg, manifest, self.settings.partition_id)
        if self.settings.data_path is None:
            raise DataError("node config has neither 'partition-id' (simulation) nor "
                            "'data-path' (deployment)")
        return hospital_site(self.settings.data_path, self.site_name(), manifest)

    def site_name(self, site: SiteSplit | None = None) -> str:
        """The hospital's name (node config wins; simulation uses the data's site name)."""
        if self.settings.site_name:
            return self.settings.site_name
        return site.name if site is not None else "unknown"

    def inputs(self, model: SplitModel, site: SiteSplit, backbone_sha: str
               ) -> tuple[np.ndarray, np.ndarray, bool]:
        """(train inputs, test inputs, features_cached): cached frozen features when possible."""
        trainable = self.cfg.model.trainable
        if frozen_prefix_blocks(model, trainable) == 0:
            return site.x_train, site.x_test, False
        cache = FeatureCache(self.settings.workdir / "features")
        key = FeatureCache.key(backbone_sha, trainable, fingerprint(site))
        hit = cache.get(key)
        if hit is not None:
            return hit[0], hit[1], True
        with torch.no_grad():
            train = frozen_features(model, torch.from_numpy(site.x_train), trainable).numpy()
            test = frozen_features(model, torch.from_numpy(site.x_test), trainable).numpy()
        cache.put(key, train, test)
        return train, test, True

    def seed(self, server_round: int) -> int:
        """A different but reproducible seed per node and round."""
        who = f"{self.settings.partition_id}|{self.settings.site_name}"
        text = f"{self.cfg.seed}|{who}|{server_round}"
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def declared_rows(node: Node, backbone_sha: str) -> int:
    """Training rows this site declares when provisioned (the server caps num-examples)."""
    _, manifest = node.backbones.load(backbone_sha)
    return len(node.site(manifest).y_train)


def check_arrays(received: dict[str, torch.Tensor], expected: list[str]) -> None:
    """The server must send exactly the trainable tensors."""
    if set(received) != set(expected):
        extra = sorted(set(received) - set(expected))
        missing = sorted(set(expected) - set(received))
        raise ValueError(f"message tensors do not match the trainable set: unexpected {extra}, "
                         f"missing {missing}")


def train(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str, server_round: int,
          proximal_mu: float) -> tuple[dict[str, torch.Tensor], TrainResult, str]:
    """Local training of the trainable tensors; returns (tensors, result, site name)."""
    faults, pid = node.cfg.federation.faults, node.settings.partition_id
    maybe_fail(faults, pid, node.settings.num_partitions, server_round)
    model, manifest, names = node.model(backbone_sha)
    check_arrays(arrays, names)
    load_state(model, arrays, where="train message")
    site = node.site(manifest)
    x_train, _, cached = node.inputs(model, site, backbone_sha)
    optim = replace(node.cfg.federation.local, proximal_mu=proximal_mu)
    seed = node.seed(server_round)
    seed_everything(seed)
    result = train_local(
        model, x_train, site.y_train, optim, node.cfg.model.trainable, node.device, seed,
        global_state=arrays if proximal_mu > 0 else None, features_cached=cached,
    )
    state = model.state_dict()
    # reply in the order received: Flower's fixedclipping_mod pairs tensors by position
    trained = {n: state[n].detach().cpu() for n in arrays}
    trained = maybe_poison(faults, pid, node.settings.num_partitions, arrays, trained)
    return trained, result, node.site_name(site)


def evaluate_local(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str,
                   server_round: int = 0) -> tuple[dict[str, float], int, str]:
    """Metrics of the received global model on the site's local test split."""
    maybe_fail(node.cfg.federation.faults, node.settings.partition_id,
               node.settings.num_partitions, server_round)
    model, manifest, names = node.model(backbone_sha)
    check_arrays(arrays, names)
    load_state(model, arrays, where="evaluate message")
    site = node.site(manifest)
    _, x_test, cached = node.inputs(model, site, backbone_sha)
    metrics = evaluate(model, x_test, site.y_test, node.device,
                       trainable=node.cfg.model.trainable, features_cached=cached)
    return nan_for_none(metrics), len(site.y_test), node.site_name(site)


def nan_for_none(metrics: dict[str, float | None]) -> dict[str, float]:
    """Flower metric records hold numbers only: an undefined metric travels as NaN."""
    return {k: (math.nan if v is None else float(v)) for k, v in metrics.items()}


def adapt(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str, steps: int, lr: float
          ) -> tuple[dict[str, float], int, str]:
    """Fine-tune the global head on local train data; before/after test metrics.

    The personalised head stays at the site (`<workdir>/personalised/head.safetensors`).
    """
    model, manifest, names = node.model(backbone_sha)
    check_arrays(arrays, names)
    load_state(model, arrays, where="adapt message")
    site = node.site(manifest)
    x_train, x_test, cached = node.inputs(model, site, backbone_sha)
    trainable = node.cfg.model.trainable
    before = evaluate(model, x_test, site.y_test, node.device, trainable=trainable,
                      features_cached=cached)
    optim = replace(node.cfg.federation.local, lr=lr, steps=steps, epochs=0, proximal_mu=0.0)
    seed_everything(node.seed(10_000))
    train_local(model, x_train, site.y_train, optim, trainable, node.device, node.seed(10_000),
                features_cached=cached)
    after = evaluate(model, x_test, site.y_test, node.device, trainable=trainable,
                     features_cached=cached)
    out = node.settings.workdir / "personalised" / "head.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    atomic_write_bytes(out, state_to_bytes({n: state[n] for n in names}))
    metrics = {f"before-{k}": v for k, v in nan_for_none(before).items()}
    metrics.update({f"after-{k}": v for k, v in nan_for_none(after).items()})
    return metrics, len(site.y_test), node.site_name(site)


def save_model(node: Node, version: int, manifest_json: str, sig_hex: str, head_bytes: bytes,
               backbone_bytes: bytes | None) -> Path:
    """Assemble the final global bundle in `<workdir>/models/vNNNN` and verify it."""
    manifest = json.loads(manifest_json)
    if backbone_bytes is None:
        backbone_bytes, _ = node.backbones.load(manifest["files"]["backbone.safetensors"])
    final = node.settings.workdir / "models" / f"v{version:04d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    pub = load_public_key(node.settings.signing_pub) if node.settings.signing_pub else None
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "backbone.safetensors").write_bytes(backbone_bytes)
        (tmp / "head.safetensors").write_bytes(head_bytes)
        (tmp / "manifest.json").write_text(manifest_json, encoding="utf-8")
        (tmp / "manifest.sig").write_bytes(bytes.fromhex(sig_hex))
        load_bundle(tmp, pub)  # hashes (and signature) checked before it becomes visible
    if node.settings.data_path is not None:
        # `medfed predict` needs this hospital's own normalisation statistics.
        stats = hospital_normaliser(node.settings.data_path, manifest).to_dict()
        atomic_write_text(final.parent / SITE_STATS, json.dumps(stats) + "\n")
    return final
