"""In-process emulation of a `medfed simulate` run: the same `common/` functions, no Flower.

The quality tables need many (configuration x seed) runs; Flower's runtime would spend most of
their time starting Ray. This module replays what the ServerApp and ClientApp compute, step by
step, with the product's own functions: the bundle comes from :func:`common.pretrain.pretrain`,
data from :func:`common.data.federated.load_federated`, every node trains with
:func:`common.training.train_local` seeded by :meth:`client.node.Node.seed` on frozen-backbone
features as `client/node.py` caches them, every round's global model is scored at the sites
with :func:`common.scoring.score_model` and aggregated with
:func:`server.heldout.aggregate_sites`, `best` is picked by the registry's rule on validation,
and each site builds its model with :func:`common.personalise.personalise`. The server's
aggregation is Flower's arithmetic, operation for operation (:class:`Aggregator`), so every
version equals the one `medfed simulate` publishes, bit for bit, on the same machine
(tests/test_emulation_exact.py); `benchmarks/heart.py` and `benchmarks/breast.py` also run
the real `medfed simulate` for their headline configuration and compare.
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
from common.bundle import BundleError, load_bundle
from common.config import Config, OperatingPointConfig, OptimConfig
from common.data.federated import FederatedData, load_federated
from common.data.preprocess import SiteStats
from common.data.splits import SiteSplit, carve
from common.device import resolve_device, seed_everything
from common.manifest import model_from_manifest, stats_from_manifest
from common.models import (
    SplitModel,
    build_model,
    frozen_features,
    frozen_prefix_blocks,
    load_state,
    set_trainable,
)
from common.personalise import personalise as personalise_site
from common.pretrain import pretrain
from common.registry import improves
from common.scoring import OperatingPoint, fit_operating_point, logits64, score, score_model
from common.settings import NodeSettings
from common.signing import load_or_create_signing_key
from common.training import round_trainable, train_local
from server.heldout import aggregate_sites, aggregate_test, site_combine

State = dict[str, torch.Tensor]
# how Aggregator computes; results record it, and a stored result computed otherwise is stale
# (before 2026-12-05 it averaged in float64: within ~1e-7 per round of the published tensors)
AGGREGATION = "flwr-1.42-exact"


def pretrain_tag(cfg: Config) -> str:
    """A short hash of what decides a pretrained bundle: the pretrain and model sections."""
    # pretraining always trains every tensor: `trainable` does not change the bundle
    model_cfg = replace(cfg.model, trainable="all")
    return hashlib.sha256(repr((cfg.pretrain, model_cfg)).encode()).hexdigest()[:10]


def signed_with(bundle: Path, keys: Path) -> bool:
    """Whether a cached bundle is complete and signed with the key at `keys` (the one the
    runs check it with); one left by an interrupted run or signed by an older key is not."""
    if not (bundle / "manifest.sig").exists() or not keys.exists():
        return False
    key, _ = load_or_create_signing_key(keys)
    try:
        load_bundle(bundle, key.public_key(), require_signature=True)
    except BundleError:
        return False
    return True


def bundle_for(cfg: Config, root: Path, keys: Path) -> Path:
    """Pretrain once per (seed, pretrain + model config) into `root`; reuse afterwards."""
    out = root / f"pretrain-seed{cfg.seed}-{pretrain_tag(cfg)}"
    if not signed_with(out, keys):
        key, _ = load_or_create_signing_key(keys)
        pretrain(cfg, out, key, replace=True)
    return out


def start_model(cfg: Config, bundle_dir: Path | None, keys: Path, *, pretrained: bool = True
                ) -> tuple[SplitModel, SiteStats | None]:
    """The server's starting model (as `server.federation.prepare`) and the bundle's stats.

    `pretrained=False` builds a randomly initialised model from `cfg.seed` (from scratch);
    its preprocessing is still the bundle's when one is given (normalisation `bundle`), so
    the two rows differ in the weights only.
    """
    seed_everything(cfg.seed)
    bundle = None
    if bundle_dir is not None:
        key, _ = load_or_create_signing_key(keys)
        bundle = load_bundle(bundle_dir, key.public_key(), require_signature=True)
    if not pretrained:
        stats = stats_from_manifest(bundle.manifest) if bundle is not None else None
        data = load_federated(cfg.federation.data, stats, seed=cfg.seed)
        seed_everything(cfg.seed)
        model = build_model(cfg.model.family, data.spec.input_shape, data.spec.num_classes,
                            cfg.model)
        return model, stats
    if bundle is None:
        raise ValueError("a pretrained start needs a bundle directory")
    model = model_from_manifest(bundle.manifest)
    load_state(model, {**bundle.backbone, **bundle.head}, where=str(bundle_dir))
    if cfg.federation.reset_head:
        from server.federation import reset_head  # imports Flower: only when needed

        reset_head(model, cfg.seed)
    seed_everything(cfg.seed)
    return model, stats_from_manifest(bundle.manifest)


def node_seed(cfg: Config, partition_id: int, server_round: int) -> int:
    """The seed a simulated node uses in `server_round` (client/node.py's own formula)."""
    # the node config Flower's simulation gives a node; "workdir" so no run settings are needed
    settings = NodeSettings.from_node_config(
        {"partition-id": partition_id, "workdir": "."}, None)
    return Node(cfg, None, settings).seed(server_round)  # type: ignore[arg-type]


@dataclass
class SiteInputs:
    """A site's training inputs as the node trains on them (cached frozen features)."""

    site: SiteSplit
    x_train: np.ndarray
    cached: bool


def site_inputs(model: SplitModel, sites: list[SiteSplit], trainable: str,
                augment: str = "none") -> list[SiteInputs]:
    """Frozen-backbone features per site, as `Node.train_inputs` computes and caches them."""
    if frozen_prefix_blocks(model, trainable) == 0 or augment != "none":
        return [SiteInputs(s, s.x_train, False) for s in sites]
    with torch.no_grad():
        return [SiteInputs(s, frozen_features(model, torch.from_numpy(s.x_train),
                                              trainable).numpy(), True) for s in sites]


class Aggregator:
    """The server's aggregation, operation for operation as flwr 1.42 computes it, so that an
    emulated run publishes the very tensors `medfed simulate` publishes (checked bit for bit in
    tests/test_emulation_exact.py): FedAvg's and FedProx's weighted mean
    (`flwr/serverapp/strategy/strategy_utils.py::aggregate_arrayrecords`: float32 products
    summed in reply order, which the server makes site order), then FedAdagrad's, FedAdam's
    or FedYogi's server step (`fedopt.py`, `fedadagrad.py`, `fedadam.py`, `fedyogi.py`: NumPy
    with their own dtype promotions). Float sums depend on their order: averaging in float64
    instead moved the weights by ~1e-7 per round, which after 160 BreastMNIST rounds had
    changed the version kept."""

    MEAN = ("fedavg", "fedprox")
    SERVER_STEP = ("fedadagrad", "fedadam", "fedyogi")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg.federation.strategy
        if self.cfg.name not in (*self.MEAN, *self.SERVER_STEP):
            known = ", ".join((*self.MEAN, *self.SERVER_STEP))
            raise ValueError(f"the emulation has no aggregation for strategy "
                             f"'{self.cfg.name}' (it knows {known})")
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.round = 0

    def __call__(self, current: State, replies: list[tuple[State, int]]) -> State:
        """The next global tensors from `current` and the (tensors, examples) replies, given
        in site order."""
        total = sum(n for _, n in replies)
        mean: dict[str, np.ndarray] = {}
        for state, n in replies:
            weight = n / total
            for k in current:
                value = state[k].numpy()
                mean[k] = value * weight if k not in mean else mean[k] + value * weight
        self.round += 1
        if self.cfg.name in self.MEAN:
            return {k: torch.from_numpy(v) for k, v in mean.items()}
        return {k: torch.from_numpy(np.asarray(v)) for k, v in self._step(current, mean).items()}

    def _step(self, current: State, mean: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self.cfg
        x = {k: t.numpy() for k, t in current.items()}
        delta = {k: mean[k] - x[k] for k in mean}
        beta_1 = 0.0 if s.name == "fedadagrad" else s.beta_1  # FedAdagrad fixes it at 0
        m = self.m or {k: np.zeros_like(v) for k, v in mean.items()}
        self.m = {k: beta_1 * v + (1 - beta_1) * delta[k] for k, v in m.items()}
        v0 = self.v or {k: np.zeros_like(v) for k, v in mean.items()}
        eta = s.eta
        if s.name == "fedadagrad":
            self.v = {k: v + (delta[k] ** 2) for k, v in v0.items()}
        elif s.name == "fedyogi":
            self.v = {k: v - (1.0 - s.beta_2) * (delta[k] ** 2) * np.sign(v - delta[k] ** 2)
                      for k, v in v0.items()}
        else:  # fedadam, with Flower's bias-corrected step size (exponent round + 1)
            self.v = {k: s.beta_2 * v + (1 - s.beta_2) * (delta[k] ** 2) for k, v in v0.items()}
            eta = (s.eta * np.sqrt(1 - np.power(s.beta_2, self.round + 1.0))
                   / (1 - np.power(s.beta_1, self.round + 1.0)))
        return {k: xk + eta * self.m[k] / (np.sqrt(self.v[k]) + s.tau) for k, xk in x.items()}


def site_scores(model: SplitModel, sites: list[SiteSplit]) -> dict[str, dict[str, Any]]:
    """Each site's validation and test metrics of `model` (as `client.node.evaluate_local`)."""
    op = OperatingPoint()
    return {s.name: {"validation": score_model(model, s.x_val, s.y_val, op),
                     "test": score_model(model, s.x_test, s.y_test, op)} for s in sites}


def federate(cfg: Config, model: SplitModel, data: FederatedData, personalise: bool = True
             ) -> dict[str, Any]:
    """Rounds, validation check per round, `best`, then (`personalise`) each site's model.

    Returns the chosen global model's site metrics (`sites`), its aggregated `validation` and
    `test`, the chosen `version`, the validation curve, and `site_models`. `model` is left
    holding the chosen version.
    """
    device = resolve_device(cfg.device)
    trainable = cfg.model.trainable
    names = set_trainable(model, trainable)
    inputs = site_inputs(model, data.sites, trainable, cfg.federation.local.augment)
    state = model.state_dict()
    current: State = {n: state[n].detach().clone() for n in names}
    aggregate = Aggregator(cfg)
    mu = cfg.federation.strategy.proximal_mu if cfg.federation.strategy.name == "fedprox" else 0
    optim = replace(cfg.federation.local, proximal_mu=mu)
    metric = cfg.federation.best_metric
    combine = site_combine(cfg.federation.heldout)
    versions: list[State] = []
    curve: list[float | None] = []
    best: tuple[int, float | None] | None = None
    for rnd in range(0, cfg.federation.rounds + 1):
        if rnd > 0:
            replies = []
            for pid, inp in enumerate(inputs):
                local = copy.deepcopy(model)
                load_state(local, current, where="emulated train message")
                seed = node_seed(cfg, pid, rnd)
                seed_everything(seed)
                now = round_trainable(trainable, cfg.federation.head_warmup_rounds, rnd)
                # head warm-up: the received backbone runs whole (no cached prefix applies)
                x, cached = ((inp.x_train, inp.cached) if now == trainable
                             else (inp.site.x_train, False))
                res = train_local(local, x, inp.site.y_train, optim, now,
                                  device, seed, global_state=current if mu > 0 else None,
                                  features_cached=cached)
                local_state = local.state_dict()
                replies.append(({n: local_state[n].detach().cpu() for n in names},
                                res.num_examples))
            current = aggregate(current, replies)
        load_state(model, current, where="emulated global model")
        sites = site_scores(model, data.sites)
        value = aggregate_sites([s["validation"] for s in sites.values()], combine).get(metric)
        value = None if value is None or not np.isfinite(value) else float(value)
        versions.append({k: v.clone() for k, v in current.items()})
        curve.append(value)
        if best is None or (value is not None and improves(metric, value, best[1])):
            best = (rnd, value)
    assert best is not None
    chosen = best[0] if cfg.federation.final_model == "best" else cfg.federation.rounds
    load_state(model, versions[chosen], where="emulated chosen version")
    sites = site_scores(model, data.sites)
    out: dict[str, Any] = {
        "version": chosen, "validation_curve": curve, "sites": sites,
        "validation": aggregate_sites([s["validation"] for s in sites.values()], combine),
        "test": aggregate_test(sites, combine),
    }
    if personalise:
        out["site_models"] = site_models(cfg, model, data)
    return out


def site_models(cfg: Config, model: SplitModel, data: FederatedData) -> dict[str, Any]:
    """`client.node.personalise_site` at every site, without the files: their summaries."""
    device = resolve_device(cfg.device)
    names = set_trainable(model, cfg.model.trainable)
    out = {}
    for pid, site in enumerate(data.sites):
        seed = node_seed(cfg, pid, 10_000)
        seed_everything(seed)
        local = copy.deepcopy(model)
        set_trainable(local, cfg.model.trainable)
        result = personalise_site(local, site, names, cfg.model.trainable,
                                  cfg.federation.adaptation, cfg.federation.local,
                                  cfg.federation.operating_point, device, seed)
        kept = copy.deepcopy(model)
        load_state(kept, result.state, where="emulated site model")
        out[site.name] = {**result.summary(), "cross_fitted_validation_balanced_accuracy":
                          cross_fitted_ba(logits64(kept, site.x_val), site.y_val,
                                          cfg.federation.operating_point, seed)}
    return out


def cross_fitted_ba(logits: np.ndarray, y: np.ndarray, op_cfg: OperatingPointConfig,
                    seed: int) -> float | None:
    """Balanced accuracy of the operating-point rule estimated out of sample on validation.

    The validation split is halved (stratified, seeded); the rule is fitted on one half and
    scored on the other, both ways. A rule fitted and scored on the same rows (Youden's
    threshold maximises exactly that balanced accuracy) would always look best; this is the
    criterion benchmarks/heart.py chooses site-model settings by.
    """
    if len(y) < 4:
        return None
    a_idx = np.arange(len(y))
    keep, _, held, _ = carve(a_idx, y, 0.5, seed)
    scores = []
    for fit, test in ((keep, held), (held, keep)):
        op = fit_operating_point(logits[fit], y[fit], op_cfg)
        value = score(logits[test], y[test], op)["balanced_accuracy"]
        if value is not None:
            scores.append(float(value))
    return float(np.mean(scores)) if scores else None


def train_alone(cfg: Config, model: SplitModel, x: np.ndarray, y: np.ndarray,
                optim: OptimConfig, seed: int) -> SplitModel:
    """A copy of `model` trained centrally (local-only or pooled baselines)."""
    local = copy.deepcopy(model)
    seed_everything(seed)
    train_local(local, x, y, optim, cfg.model.trainable, resolve_device(cfg.device), seed)
    return local
