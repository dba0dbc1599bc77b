"""One federated transfer-learning run on the server: the body of the ServerApp.

Plain steps over `common/` functions: load and verify the pretrained bundle, choose the
trainable tensors, run the configured Flower strategy through a provisioning Grid, check and
publish every global model, deliver the final model to the hospitals, and optionally let each
site adapt it locally.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import records as rk
from common.bundle import Bundle, load_bundle
from common.config import Config
from common.data.federated import FederatedData, load_federated
from common.device import resolve_device, seed_everything
from common.manifest import (
    json_metrics,
    make_manifest,
    model_from_manifest,
    normaliser_from_manifest,
)
from common.models import SplitModel, load_state, set_trainable, split_state
from common.settings import RunSettings
from common.signing import load_or_create_signing_key
from common.training import evaluate
from server.checkpoint import (
    drop_uncommitted_versions,
    load_checkpoint,
    restore_strategy,
    save_checkpoint,
)
from server.history import RunHistory
from server.privacy import privacy_summary, sampled_per_round, wrap_privacy
from server.provisioning import BackbonePayload, ProvisioningGrid
from server.registry import Registry
from server.strategies import build_strategy

log = logging.getLogger("medfed.server")


def _metric_record(metrics: dict[str, Any]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()
                         if isinstance(v, int | float) and v is not None})


def load_payload(bundle_dir: Path) -> BackbonePayload:
    """The backbone file and signed manifest, exactly as written by `medfed pretrain`."""
    manifest_text = (bundle_dir / "manifest.json").read_text(encoding="utf-8")
    file_bytes = (bundle_dir / "backbone.safetensors").read_bytes()
    return BackbonePayload(
        sha256=hashlib.sha256(file_bytes).hexdigest(),
        file_bytes=file_bytes,
        manifest_json=manifest_text,
        manifest_sig=(bundle_dir / "manifest.sig").read_bytes().hex(),
    )


def reset_head(model: SplitModel, seed: int) -> None:
    """A fresh, seeded head for a new target task (the backbone stays pretrained)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = 1.0 / float(np.sqrt(model.head.in_features))
        model.head.weight.uniform_(-bound, bound, generator=gen)
        model.head.bias.uniform_(-bound, bound, generator=gen)


@dataclass
class Federation:
    """State of one run; `evaluate_round` is the strategy's `evaluate_fn`."""

    cfg: Config
    settings: RunSettings
    bundle: Bundle
    model: SplitModel
    trainable: list[str]
    data: FederatedData
    registry: Registry
    grid: ProvisioningGrid
    history: RunHistory
    device: torch.device
    round_offset: int = 0  # rounds committed before this (resumed) run
    strategy: Any = None
    started: float = field(default_factory=time.monotonic)

    def _load_arrays(self, arrays: ArrayRecord) -> None:
        load_state(self.model, arrays.to_torch_state_dict(), where="global model")

    def _site_metrics(self, message_type: str) -> dict[str, dict[str, Any]]:
        replies = self.grid.last_replies.pop(message_type, [])
        out: dict[str, dict[str, Any]] = {}
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            name = self.grid.site_names.get(node, f"node-{node}")
            metrics = reply.content.metric_records.get(rk.METRICS)
            if metrics is not None:
                out[name] = json_metrics({k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
                                          if isinstance(v, int | float)})
        return out

    def evaluate_round(self, local_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Held-out check of the global model, publish it as a signed version, commit."""
        server_round = local_round + self.round_offset
        self._load_arrays(arrays)
        heldout = evaluate(self.model, self.data.heldout_x, self.data.heldout_y, self.device)
        if local_round == 0 and self.round_offset > 0:  # resumed: round already published
            return _metric_record(heldout)
        sites = self._site_metrics("evaluate") if server_round > 0 else {}
        train = self._site_metrics("train") if server_round > 0 else {}
        metrics = json_metrics({"heldout": heldout, "sites": sites, "train": train})
        backbone, head = split_state(self.model)
        manifest = make_manifest(
            self.cfg, self.data.spec, normaliser_from_manifest(self.bundle.manifest),
            self.bundle.manifest["model"], version=server_round, round_num=server_round,
            strategy=self.cfg.federation.strategy.name, metrics=metrics,
            sites=sorted(set(self.grid.site_names.values())), source=self.bundle.manifest["source"],
        )
        score = heldout.get(self.cfg.federation.best_metric)
        self.registry.publish(server_round, backbone, head, manifest, score,
                              self.cfg.federation.best_metric)
        if self.grid.excluded:
            metrics["excluded"] = dict(self.grid.excluded)
        self.history.record(server_round, metrics, time.monotonic() - self.started)
        save_checkpoint(self.settings.run_dir, server_round, self.cfg.federation.strategy.name,
                        self.strategy)
        log.info("%s", self.history.progress_line(server_round, self.cfg.federation.rounds,
                                                   self.cfg.federation.best_metric))
        return _metric_record(heldout)

    def deliver_final(self, version: int) -> None:
        """Send the final signed version to every node, which saves it in its model dir."""
        vdir = self.registry.version_dir(version)
        meta = ConfigRecord({
            rk.MANIFEST_JSON: (vdir / "manifest.json").read_text(encoding="utf-8"),
            rk.MANIFEST_SIG: (vdir / "manifest.sig").read_bytes().hex(),
            rk.VERSION: version,
        })
        head = np.frombuffer((vdir / "head.safetensors").read_bytes(), dtype=np.uint8)
        content: dict[str, Any] = {rk.BUNDLE_META: meta,
                                   rk.HEAD_FILE: ArrayRecord({rk.HEAD_FILE: Array(head)})}
        backbone_bytes = (vdir / "backbone.safetensors").read_bytes()
        if hashlib.sha256(backbone_bytes).hexdigest() != self.grid.payload.sha256:
            # trained backbone blocks: the node's cached backbone is not this version's
            content[rk.BACKBONE_FILE] = ArrayRecord(
                {rk.BACKBONE_FILE: Array(np.frombuffer(backbone_bytes, dtype=np.uint8))})
        nodes = sorted(self.grid.provisioned)
        messages = [Message(RecordDict(content), dst_node_id=n,
                            message_type=f"query.{rk.QUERY_SAVE_MODEL}") for n in nodes]
        replies = self.grid.send_and_receive(messages)
        saved = sum(1 for r in replies if not r.has_error())
        for r in replies:
            if r.has_error():
                log.warning("node %d did not save the final model: %s",
                            r.metadata.src_node_id, r.error.reason)
        log.info("final model v%04d saved by %d/%d nodes", version, saved, len(nodes))

    def adapt(self, arrays: ArrayRecord) -> dict[str, dict[str, Any]]:
        """Local adaptation at every node; returns before/after test metrics per site."""
        ad = self.cfg.federation.adaptation
        messages = [
            Message(RecordDict({rk.ARRAYS: arrays,
                                rk.CONFIG: ConfigRecord({
                                    "steps": ad.steps, "lr": ad.lr,
                                    rk.BACKBONE_SHA256: self.grid.payload.sha256})}),
                    dst_node_id=n, message_type=f"query.{rk.QUERY_ADAPT}")
            for n in sorted(self.grid.provisioned)
        ]
        self.grid.send_and_receive(messages)
        return self._site_metrics(f"query.{rk.QUERY_ADAPT}")


def prepare(grid: Grid, settings: RunSettings) -> Federation:
    """Load config, key, bundle, data and model; nothing is sent yet."""
    cfg = settings.load_config()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    key, _ = load_or_create_signing_key(settings.keys)
    bundle_dir = settings.bundle
    if bundle_dir is None:
        from common.pretrain import pretrain

        bundle_dir = settings.run_dir / "pretrain"
        if not (bundle_dir / "manifest.sig").exists():
            log.info("no --bundle given: pretraining into %s", bundle_dir)
            pretrain(cfg, bundle_dir, key)
    bundle = load_bundle(bundle_dir, key.public_key(), require_signature=True)
    model = model_from_manifest(bundle.manifest)
    load_state(model, {**bundle.backbone, **bundle.head}, where=str(bundle_dir), complete=True)
    if cfg.federation.reset_head:
        reset_head(model, cfg.seed)
    trainable = set_trainable(model, cfg.model.trainable)
    data = load_federated(cfg.federation.data, normaliser_from_manifest(bundle.manifest),
                          seed=cfg.seed)
    provisioning = ProvisioningGrid(grid, load_payload(bundle_dir),
                                    timeout=cfg.federation.strategy.round_timeout,
                                    validation=cfg.federation.validation,
                                    audit_path=settings.run_dir / "audit.jsonl")
    registry = Registry(settings.run_dir / "registry", key)
    offset = _resume_point(settings, registry, model, cfg.federation.best_metric, key)
    history = RunHistory(settings.run_dir)
    return Federation(cfg, settings, bundle, model, trainable, data, registry, provisioning,
                      history, device, round_offset=offset)


def _resume_point(settings: RunSettings, registry: Registry, model: SplitModel,
                  best_metric: str, key: Any) -> int:
    """Rounds already committed; loads the committed global model into `model` when resuming."""
    checkpoint = load_checkpoint(settings.run_dir)
    if not settings.resume:
        if checkpoint is not None:
            raise FileExistsError(f"run directory {settings.run_dir} holds a started run; "
                                  "continue it with --resume or choose another directory")
        return 0
    if checkpoint is None:
        log.info("nothing to resume in %s: starting at round 1", settings.run_dir)
        drop_uncommitted_versions(registry.root, -1)
        return 0
    dropped = drop_uncommitted_versions(registry.root, checkpoint.round)
    if dropped:
        log.warning("removed versions %s of an uncommitted round", dropped)
    registry.repair_pointers(best_metric)
    version = load_bundle(registry.version_dir(checkpoint.round), key.public_key(),
                          require_signature=True)
    load_state(model, {**version.backbone, **version.head}, where=str(version.path),
               complete=True)
    log.info("resuming after round %d", checkpoint.round)
    return checkpoint.round


def run_federation(grid: Grid, settings: RunSettings) -> Federation:
    """The whole run: rounds, checks, publication, delivery, adaptation, summary."""
    fed = prepare(grid, settings)
    cfg = fed.cfg
    state = fed.model.state_dict()
    initial = ArrayRecord({n: state[n].detach().clone() for n in fed.trainable})
    strategy = build_strategy(cfg.federation.strategy, len(fed.data.sites))
    fed.strategy = strategy
    checkpoint = load_checkpoint(settings.run_dir) if fed.round_offset else None
    if checkpoint is not None:
        restore_strategy(strategy, checkpoint)
    strategy = wrap_privacy(strategy, cfg.federation.privacy,
                            sampled_per_round(cfg.federation.strategy, len(fed.data.sites)))
    remaining = max(cfg.federation.rounds - fed.round_offset, 0)
    round_config = ConfigRecord({rk.BACKBONE_SHA256: fed.grid.payload.sha256,
                                 rk.ROUND_OFFSET: fed.round_offset})
    log.info("federated run: %s, %d rounds, strategy %s, trainable %s (%d tensors)",
             cfg.name, cfg.federation.rounds, cfg.federation.strategy.name,
             cfg.model.trainable, len(fed.trainable))
    result = strategy.start(
        grid=fed.grid, initial_arrays=initial, num_rounds=remaining,
        timeout=cfg.federation.strategy.round_timeout, train_config=round_config,
        evaluate_config=ConfigRecord({rk.BACKBONE_SHA256: fed.grid.payload.sha256}),
        evaluate_fn=fed.evaluate_round,
    )
    final = result.arrays if len(result.arrays) else initial
    last = max(fed.registry.versions())
    fed.deliver_final(last)
    adaptation: dict[str, dict[str, Any]] = {}
    if cfg.federation.adaptation.enabled:
        adaptation = fed.adapt(final)
    fed.history.finish(
        traffic={fed.grid.site_names.get(n, f"node-{n}"): vars(t)
                 for n, t in fed.grid.traffic.items()},
        adaptation=adaptation,
        registry=fed.registry,
        best_metric=cfg.federation.best_metric,
        extra=privacy_summary(cfg, last, len(fed.data.sites)),
    )
    return fed
