"""In-process emulation of a `medfed simulate` run: the same `common/` functions, no Flower.

The quality tables need many (configuration x seed) runs; Flower's runtime would spend most of
their time starting Ray. This module replays what the ServerApp and ClientApp compute, step by
step, with the product's own functions: the bundle comes from :func:`common.pretrain.pretrain`,
data from :func:`common.data.federated.load_federated`, every node trains with
:func:`common.training.train_local` seeded by :meth:`client.node.Node.seed`, on frozen-backbone
features exactly as `client/node.py` caches them, and the server aggregates like Flower's
FedAvg / FedProx / FedYogi. `benchmarks/heart.py` runs the real `medfed simulate` for the
headline configurations and shows that both agree.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.node import Node
from common.bundle import load_bundle
from common.config import Config, OptimConfig
from common.data.federated import FederatedData, SiteSplit, load_federated
from common.device import resolve_device, seed_everything
from common.manifest import model_from_manifest, normaliser_from_manifest
from common.metrics import compute_metrics
from common.models import (
    SplitModel,
    build_model,
    frozen_features,
    frozen_prefix_blocks,
    load_state,
    set_trainable,
)
from common.pretrain import pretrain
from common.settings import NodeSettings
from common.signing import load_or_create_signing_key
from common.training import evaluate, predict_proba, train_local

State = dict[str, torch.Tensor]


def bundle_for(cfg: Config, root: Path, keys: Path) -> Path:
    """Pretrain once per (seed, pretrain + model config) into `root`; reuse afterwards."""
    # pretraining always trains every tensor: `trainable` does not change the bundle
    model_cfg = replace(cfg.model, trainable="all")
    tag = hashlib.sha256(repr((cfg.pretrain, model_cfg)).encode()).hexdigest()[:10]
    out = root / f"pretrain-seed{cfg.seed}-{tag}"
    if not (out / "manifest.sig").exists():
        key, _ = load_or_create_signing_key(keys)
        pretrain(cfg, out, key, replace=True)
    return out


def start_model(cfg: Config, bundle_dir: Path | None, keys: Path) -> tuple[SplitModel, Any]:
    """The server's starting model (as `server.federation.prepare`) and the bundle normaliser.

    `bundle_dir=None` builds a randomly initialised model from `cfg.seed` (from scratch).
    """
    seed_everything(cfg.seed)
    if bundle_dir is None:
        data = load_federated(cfg.federation.data, None, seed=cfg.seed)
        model = build_model(cfg.model.family, data.spec.input_shape, data.spec.num_classes,
                            cfg.model)
        return model, None
    key, _ = load_or_create_signing_key(keys)
    bundle = load_bundle(bundle_dir, key.public_key(), require_signature=True)
    model = model_from_manifest(bundle.manifest)
    load_state(model, {**bundle.backbone, **bundle.head}, where=str(bundle_dir))
    if cfg.federation.reset_head:
        from server.federation import reset_head  # imports Flower: only when needed

        reset_head(model, cfg.seed)
    seed_everything(cfg.seed)
    return model, normaliser_from_manifest(bundle.manifest)


def node_seed(cfg: Config, partition_id: int, server_round: int) -> int:
    """The seed a simulated node uses in `server_round` (client/node.py's own formula)."""
    # the node config Flower's simulation gives a node; "workdir" so no run settings are needed
    settings = NodeSettings.from_node_config(
        {"partition-id": partition_id, "workdir": "."}, None)  # type: ignore[arg-type]
    return Node(cfg, None, settings).seed(server_round)  # type: ignore[arg-type]


@dataclass
class SiteInputs:
    """A site's inputs as the node trains on them (cached frozen features when possible)."""

    site: SiteSplit
    x_train: np.ndarray
    x_test: np.ndarray
    cached: bool


def site_inputs(model: SplitModel, sites: list[SiteSplit], trainable: str) -> list[SiteInputs]:
    """Frozen-backbone features per site, as `Node.inputs` computes and caches them."""
    if frozen_prefix_blocks(model, trainable) == 0:
        return [SiteInputs(s, s.x_train, s.x_test, False) for s in sites]
    out = []
    with torch.no_grad():
        for s in sites:
            tr = frozen_features(model, torch.from_numpy(s.x_train), trainable).numpy()
            te = frozen_features(model, torch.from_numpy(s.x_test), trainable).numpy()
            out.append(SiteInputs(s, tr, te, True))
    return out


class Aggregator:
    """Flower's FedAvg weighting (num-examples), plus FedYogi's server optimiser."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.federation.strategy
        self.m: State = {}
        self.v: State = {}

    def __call__(self, current: State, replies: list[tuple[State, int]]) -> State:
        total = float(sum(n for _, n in replies))
        avg = {k: sum(s[k].double() * (n / total) for s, n in replies) for k in current}
        if self.cfg.name != "fedyogi":
            return {k: v.float() for k, v in avg.items()}
        s = self.cfg
        new: State = {}
        for k, x in current.items():
            delta = avg[k] - x.double()
            self.m[k] = s.beta_1 * self.m.get(k, torch.zeros_like(delta)) + (1 - s.beta_1) * delta
            v = self.v.get(k, torch.zeros_like(delta))
            self.v[k] = v - (1.0 - s.beta_2) * delta**2 * torch.sign(v - delta**2)
            new[k] = (x.double() + s.eta * self.m[k] / (self.v[k].sqrt() + s.tau)).float()
        return new


def _site_eval(model: SplitModel, inp: SiteInputs, trainable: str, device: torch.device
               ) -> dict[str, Any]:
    return evaluate(model, inp.x_test, inp.site.y_test, device, trainable=trainable,
                    features_cached=inp.cached)


def federate(cfg: Config, model: SplitModel, data: FederatedData) -> dict[str, Any]:
    """Rounds of local training and aggregation; final global + adapted metrics per site."""
    device = resolve_device(cfg.device)
    trainable = cfg.model.trainable
    names = set_trainable(model, trainable)
    inputs = site_inputs(model, data.sites, trainable)
    state = model.state_dict()
    current: State = {n: state[n].detach().clone() for n in names}
    aggregate = Aggregator(cfg)
    mu = cfg.federation.strategy.proximal_mu if cfg.federation.strategy.name == "fedprox" else 0
    optim = replace(cfg.federation.local, proximal_mu=mu)
    for rnd in range(1, cfg.federation.rounds + 1):
        replies = []
        for pid, inp in enumerate(inputs):
            local = copy.deepcopy(model)
            load_state(local, current, where="emulated train message")
            seed = node_seed(cfg, pid, rnd)
            seed_everything(seed)
            res = train_local(local, inp.x_train, inp.site.y_train, optim, trainable, device,
                              seed, global_state=current if mu > 0 else None,
                              features_cached=inp.cached)
            local_state = local.state_dict()
            replies.append(({n: local_state[n].detach().cpu() for n in names}, res.num_examples))
        current = aggregate(current, replies)
    load_state(model, current, where="emulated global model")
    out: dict[str, Any] = {
        "sites": {i.site.name: _site_eval(model, i, trainable, device) for i in inputs},
        "heldout": evaluate(model, data.heldout_x, data.heldout_y, device),
    }
    if cfg.federation.adaptation.enabled:
        out["adapted"] = adapt(cfg, model, inputs, device)
    return out


def adapt(cfg: Config, model: SplitModel, inputs: list[SiteInputs], device: torch.device
          ) -> dict[str, Any]:
    """Each site fine-tunes the global model on its train split (as `client.node.adapt`)."""
    ad = cfg.federation.adaptation
    optim = replace(cfg.federation.local, lr=ad.lr, steps=ad.steps, epochs=0, proximal_mu=0.0)
    sites: dict[str, Any] = {}
    hits = 0
    for pid, inp in enumerate(inputs):
        local = copy.deepcopy(model)
        seed = node_seed(cfg, pid, 10_000)
        seed_everything(seed)
        train_local(local, inp.x_train, inp.site.y_train, optim, cfg.model.trainable, device,
                    seed, features_cached=inp.cached)
        sites[inp.site.name] = _site_eval(local, inp, cfg.model.trainable, device)
        hits += round(sites[inp.site.name]["accuracy"] * len(inp.site.y_test))
    total = sum(len(i.site.y_test) for i in inputs)
    return {"sites": sites, "pooled_accuracy": hits / total}


def train_alone(cfg: Config, model: SplitModel, x: np.ndarray, y: np.ndarray,
                optim: OptimConfig, seed: int) -> SplitModel:
    """A copy of `model` trained centrally (local-only or pooled baselines)."""
    local = copy.deepcopy(model)
    seed_everything(seed)
    train_local(local, x, y, optim, cfg.model.trainable, resolve_device(cfg.device), seed)
    return local


def pooled_metrics(models: list[SplitModel], sites: list[SiteSplit], device: torch.device
                   ) -> dict[str, Any]:
    """Each site's model on its own test split, then metrics over all test rows together."""
    proba = [predict_proba(m, s.x_test, device) for m, s in zip(models, sites, strict=True)]
    y = np.concatenate([s.y_test for s in sites])
    return compute_metrics(y, np.concatenate(proba))
