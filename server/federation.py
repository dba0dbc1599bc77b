"""One federated transfer-learning run on the server: the body of the ServerApp.

Plain steps over `common/` functions: load and verify the pretrained bundle, choose the
trainable tensors, run the configured Flower strategy through a provisioning Grid, check every
global model on validation data and publish it as a signed version, deliver the chosen model
to the hospitals, and let each site build (and the server sign) its own site model.

What may choose what: the `best` version, the model delivered at the end and every site's
choices read validation metrics only. Test metrics are collected from the sites and reported,
labelled "test — not used for any choice".
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import records as rk
from common.bundle import (
    BACKBONE_FILE,
    HEAD_FILE,
    SITE_STATS_FILE,
    Bundle,
    load_bundle,
    sign_manifest,
)
from common.config import Config, ConfigError, ValidationConfig, to_dict
from common.config_check import pretrain_overlap_note, sampled_per_round
from common.data.splits import DataSpec
from common.device import resolve_device, seed_everything
from common.manifest import (
    json_metrics,
    make_manifest,
    model_from_manifest,
    stats_from_manifest,
)
from common.models import SplitModel, load_state, set_trainable, split_state
from common.names import printable
from common.registry import Registry
from common.settings import RunSettings
from common.signing import load_or_create_signing_key
from common.training import warmup_note
from server.checkpoint import (
    Checkpoint,
    count_rounds_from,
    drop_uncommitted_versions,
    load_checkpoint,
    restore_strategy,
    save_checkpoint,
    strategy_state,
)
from server.heldout import Heldout, aggregate_test, site_combine, task_and_heldout
from server.history import RunHistory
from server.privacy import privacy_summary, wrap_privacy
from server.provisioning import BackbonePayload, Enrolment, ProvisioningGrid, RunStopped
from server.strategies import build_strategy
from server.validation import SCORE_PREFIXES, check_site_model_reply, site_model_from_reply

log = logging.getLogger("medfed.server")
NODE_WAIT_POLL_S = 1.0


def _metric_record(metrics: dict[str, Any]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)})


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


def split_site_metrics(flat: dict[str, float]) -> dict[str, dict[str, Any]]:
    """`val-<k>`/`test-<k>` keys of an evaluate reply -> {"validation": ..., "test": ...}."""
    out: dict[str, dict[str, Any]] = {"validation": {}, "test": {}}
    for key, value in flat.items():
        prefix, _, name = key.partition("-")
        if prefix == "val" and name:
            out["validation"][name] = value
        elif prefix == "test" and name:
            out["test"][name] = value
    return json_metrics(out)


def _numbers(reply: Message) -> dict[str, float]:
    """The numbers of a reply's metrics record (none without one)."""
    metrics = reply.content.metric_records.get(rk.METRICS)
    return {k: float(v) for k, v in (metrics or {}).items()  # type: ignore[arg-type]
            if isinstance(v, int | float)}


class Unpublished(NamedTuple):
    """A global model's round and what it carries to its publication: the training figures,
    the exclusions and the strategy state of that round."""

    round: int
    train: dict[str, dict[str, Any]]
    excluded: dict[str, str]
    strategy_state: dict[str, torch.Tensor]


@dataclass
class Federation:
    """State of one run; `evaluate_round` is the strategy's `evaluate_fn`."""

    cfg: Config
    settings: RunSettings
    bundle: Bundle
    model: SplitModel
    trainable: list[str]
    heldout: Heldout
    spec: DataSpec  # the task every version is published for (its label names)
    registry: Registry
    grid: ProvisioningGrid
    history: RunHistory
    device: torch.device
    signing_key: Any
    round_offset: int = 0  # rounds committed before this (resumed) run
    strategy: Any = None
    started: float = field(default_factory=time.monotonic)
    previous: dict[str, np.ndarray] | None = None  # the last published global tensors
    rounds_this_start: int = 0  # rounds the strategy runs in this (possibly resumed) start
    pending: Unpublished | None = None  # evaluate_with_train: waits for the next scores

    def _load_arrays(self, arrays: ArrayRecord, server_round: int) -> None:
        """Check the aggregate before it goes anywhere, then load it into the model."""
        tensors = {n: a.numpy().astype(np.float64) for n, a in arrays.items()}
        bad = [n for n, t in tensors.items() if not np.isfinite(t).all()]
        if bad:
            raise RunStopped(f"round {server_round}: the aggregated model holds NaN or infinite "
                             f"values (tensor '{bad[0]}'); nothing of this round is published")
        bound = self.cfg.federation.validation.max_update_norm
        if self.previous is not None and bound > 0:
            step = float(np.sqrt(sum(np.sum((tensors[n] - self.previous[n]) ** 2)
                                     for n in tensors if n in self.previous)))
            if step > bound:
                raise RunStopped(f"round {server_round}: the aggregated model moved by "
                                 f"{step:.3g}, above the bound {bound:g} "
                                 "(federation.validation.max_update_norm); nothing of this "
                                 "round is published")
        self.previous = tensors
        load_state(self.model, arrays.to_torch_state_dict(), where="global model")

    def _replies(self, message_type: str) -> dict[str, Message]:
        """The last good replies of a type, by the site name each node goes by."""
        replies = self.grid.last_replies.pop(message_type, [])
        return {self.grid.site(r.metadata.src_node_id): r for r in replies if not r.has_error()}

    def _site_metrics(self, message_type: str) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, reply in self._replies(message_type).items():
            if rk.METRICS not in reply.content.metric_records:
                continue
            flat = _numbers(reply)
            out[name] = split_site_metrics(flat) if message_type == "evaluate" \
                else json_metrics(flat)
        return out

    def wait_for_nodes(self) -> list[int]:
        """Node ids once `min_nodes` are connected (Flower's strategies wait the same way)."""
        need = self.cfg.federation.strategy.min_nodes
        waited = False
        while len(nodes := sorted(self.grid.get_node_ids())) < need:
            if not waited:
                log.info("waiting for %d hospitals to connect (%d so far)", need, len(nodes))
                waited = True
            time.sleep(NODE_WAIT_POLL_S)
        return nodes

    def evaluate_at_sites(self, arrays: ArrayRecord, server_round: int) -> None:
        """Federated evaluation outside the strategy's loop (round 0: the starting model)."""
        config = ConfigRecord({rk.BACKBONE_SHA256: self.grid.payload.sha256,
                               rk.SERVER_ROUND: server_round})
        messages = [Message(RecordDict({rk.ARRAYS: arrays, rk.CONFIG: config}),
                            dst_node_id=n, message_type="evaluate")
                    for n in self.wait_for_nodes()]
        self.grid.send_and_receive(messages)

    def evaluate_round(self, local_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Validation check of the global model, publish it as a signed version, commit."""
        if self.cfg.federation.evaluate_with_train:
            return self._evaluate_with_train(local_round, arrays)
        server_round = local_round + self.round_offset
        self._load_arrays(arrays, server_round)
        if local_round == 0 and self.round_offset > 0:  # resumed: round already published
            return MetricRecord()
        if server_round == 0 and self.heldout.at_sites:
            self.evaluate_at_sites(arrays, 0)
        sites = self._site_metrics("evaluate")
        train = self._site_metrics("train") if server_round > 0 else {}
        return self._publish(self._unpublished(server_round, train), sites)

    def _unpublished(self, server_round: int, train: dict[str, dict[str, Any]]
                     ) -> Unpublished:
        return Unpublished(server_round, train, dict(self.grid.excluded),
                           strategy_state(self.strategy))

    def _evaluate_with_train(self, local_round: int, arrays: ArrayRecord) -> MetricRecord:
        """`evaluate_round` when the sites score each global model in the next train message.

        Round r's train replies score version r-1 (still loaded in `self.model`): it is
        published now, with the training figures and strategy state kept from its own round.
        The last round's model has no next train message: it gets evaluate messages.
        """
        server_round = local_round + self.round_offset
        flat = {name: _numbers(r) for name, r in
                (self._replies("train") if local_round > 0 else {}).items()}
        published = MetricRecord()
        if self.pending is not None:
            scores = {name: split_site_metrics(f) for name, f in flat.items()
                      if any(k.startswith(SCORE_PREFIXES) for k in f)}
            published = self._publish(self.pending, scores)
            self.pending = None
        self._load_arrays(arrays, server_round)
        if local_round == 0 and self.round_offset > 0:  # resumed: round already published
            return published
        version = self._unpublished(server_round, {
            name: json_metrics({k: v for k, v in f.items() if not k.startswith(SCORE_PREFIXES)})
            for name, f in flat.items()})
        if local_round < self.rounds_this_start:
            self.pending = version
            return published
        self.evaluate_at_sites(arrays, server_round)
        return self._publish(version, self._site_metrics("evaluate"))

    def _publish(self, version: Unpublished, sites: dict[str, dict[str, Any]]) -> MetricRecord:
        """`version` (the model now in `self.model`) with the sites' scores of it: check on
        validation, sign, publish, record, then commit its round with its strategy state."""
        server_round, train, excluded = version.round, version.train, version.excluded
        validation = self.heldout.evaluate(self.model, sites)
        test = aggregate_test(sites, site_combine(self.heldout.mode))
        metrics = json_metrics({"validation": validation, "test": test,
                                "sites": sites, "train": train})
        backbone, head = split_state(self.model)
        manifest = make_manifest(
            self.cfg, self.spec,
            stats_from_manifest(self.bundle.manifest), self.bundle.manifest["model"],
            version=server_round, round_num=server_round,
            strategy=self.cfg.federation.strategy.name, metrics=metrics,
            # every provisioned hospital by the name the server knows it by (enrolled names
            # win over reported ones)
            sites=sorted({self.grid.site(n) for n in self.grid.provisioned}),
            source=self.bundle.manifest["source"],
        )
        best_metric = self.cfg.federation.best_metric
        self.registry.publish(server_round, backbone, head, manifest,
                              metrics["validation"].get(best_metric), best_metric,
                              self.heldout.label)
        if excluded:
            metrics["excluded"] = excluded
        self.history.write_splits({self.grid.site(n): sizes
                                   for n, sizes in self.grid.split_sizes.items()})
        self.history.record(server_round, metrics, time.monotonic() - self.started)
        save_checkpoint(self.settings.run_dir, server_round, self.cfg.federation.strategy.name,
                        version.strategy_state, resume_settings(self.cfg))
        log.info("%s", self.history.progress_line(server_round, self.cfg.federation.rounds,
                                                   best_metric))
        return _metric_record(metrics["validation"])

    def final_version(self) -> int:
        """The version hospitals get at the end: `best` (chosen on validation) or `latest`."""
        pointer = self.registry.read_pointer(self.cfg.federation.final_model)
        return int(pointer["version"]) if pointer else max(self.registry.versions())

    def deliver_final(self, version: int) -> None:
        """Send a signed version to every node, which saves it in its model dir."""
        vdir = self.registry.version_dir(version)
        meta = ConfigRecord({
            rk.MANIFEST_JSON: (vdir / "manifest.json").read_text(encoding="utf-8"),
            rk.MANIFEST_SIG: (vdir / "manifest.sig").read_bytes().hex(),
            rk.VERSION: version,
        })
        head = np.frombuffer((vdir / HEAD_FILE).read_bytes(), dtype=np.uint8)
        content: dict[str, Any] = {rk.BUNDLE_META: meta,
                                   rk.HEAD_FILE: ArrayRecord({rk.HEAD_FILE: Array(head)})}
        backbone_bytes = (vdir / BACKBONE_FILE).read_bytes()
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
                log.warning("%s did not save the final model: %s",
                            self.grid.site(r.metadata.src_node_id), printable(r.error.reason))
        log.info("model v%04d saved by %d/%d hospitals", version, saved, len(nodes))

    def site_models(self, version: int) -> dict[str, dict[str, Any]]:
        """Each site builds its model from `version`; the server signs it from its hashes."""
        vdir = self.registry.version_dir(version)
        global_bytes = (vdir / "manifest.json").read_bytes()
        global_manifest = json.loads(global_bytes)
        full = load_bundle(vdir)
        state = {**full.backbone, **full.head}
        arrays = ArrayRecord({n: state[n] for n in self.trainable})
        config = ConfigRecord({rk.BACKBONE_SHA256: self.grid.payload.sha256, rk.VERSION: version})
        asks = [Message(RecordDict({rk.ARRAYS: arrays, rk.CONFIG: config}), dst_node_id=n,
                        message_type=f"query.{rk.QUERY_ADAPT}")
                for n in sorted(self.grid.provisioned)]
        signed: dict[int, tuple[str, dict[str, Any], bytes, bytes]] = {}
        for reply in self.grid.send_and_receive(asks):
            node = reply.metadata.src_node_id
            name = self.grid.site(node)
            if reply.has_error():
                log.warning("%s could not build its site model: %s", name,
                            printable(reply.error.reason))
                continue
            problem = check_site_model_reply(reply)
            if problem is not None:
                self.grid.exclude(node, f"site model reply: {problem}")
                continue
            site, files = site_model_from_reply(reply)
            manifest = site_manifest(global_manifest, global_bytes, name, site)
            body, sig = sign_manifest(manifest, files, self.signing_key)
            signed[node] = (name, site, body, sig)
        saves = [Message(RecordDict({rk.BUNDLE_META: ConfigRecord({
                    rk.MANIFEST_JSON: body.decode("utf-8"), rk.MANIFEST_SIG: sig.hex()})}),
                         dst_node_id=node, message_type=f"query.{rk.QUERY_SAVE_SITE_MODEL}")
                 for node, (_, _, body, sig) in signed.items()]
        out: dict[str, dict[str, Any]] = {}
        for reply in self.grid.send_and_receive(saves):
            node = reply.metadata.src_node_id
            if node not in signed:
                continue
            name, site, _, _ = signed[node]
            if reply.has_error():
                log.warning("%s did not save its site model: %s", name,
                            printable(reply.error.reason))
                continue
            out[name] = {**site, "based_on_version": version}
        log.info("site models signed and saved by %d/%d hospitals", len(out), len(asks))
        return out

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Deliver the chosen version, build the site models, write the summary."""
        version = self.final_version()
        self.deliver_final(version)
        sites = self.site_models(version)
        return self.history.finish(
            traffic={self.grid.site(n): vars(t) for n, t in self.grid.traffic.items()},
            site_models=sites, registry=self.registry,
            best_metric=self.cfg.federation.best_metric,
            final={"version": version, "chosen_by": self.cfg.federation.final_model},
            extra=extra,
        )


def site_manifest(global_manifest: dict[str, Any], global_bytes: bytes, name: str,
                  site: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a site's model: the global version's, plus what the site chose."""
    manifest = {k: v for k, v in global_manifest.items()
                if k not in ("files", "backbone_sha256", "signer", "created")}
    manifest["site"] = {
        "name": name, "kept": site["kept"], "method": site["method"], "reason": site["reason"],
        "steps": site["steps"], "based_on_version": global_manifest["version"],
        "based_on_manifest_sha256": hashlib.sha256(global_bytes).hexdigest(),
        "statistics": f"{SITE_STATS_FILE} in this bundle (fitted on the site's training split)",
        "reported_by": "the site (the server signs the hashes it was sent)",
    }
    manifest["operating_point"] = site["operating_point"]
    manifest["metrics"] = {"site-validation": site["site_model"]["validation"],
                           "site-test": site["site_model"]["test"],
                           "global-validation": site["global"]["validation"],
                           "global-test": site["global"]["test"]}
    manifest["sites"] = [name]
    return json_metrics(manifest)


def prepare(grid: Grid, settings: RunSettings) -> Federation:
    """Load config, key, bundle, validation check and model; nothing is sent yet."""
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
    spec, heldout = task_and_heldout(cfg, bundle.manifest)
    provisioning = ProvisioningGrid(grid, load_payload(bundle_dir),
                                    timeout=cfg.federation.strategy.round_timeout,
                                    validation=reply_checks(cfg),
                                    audit_path=settings.run_dir / "audit.jsonl",
                                    enrolment=Enrolment.load(settings.run_dir))
    registry = Registry(settings.run_dir / "registry", key)
    offset = _resume_point(settings, registry, model, cfg.federation.best_metric, key)
    history = RunHistory(settings.run_dir, committed=offset)
    return Federation(cfg, settings, bundle, model, trainable, heldout, spec, registry,
                      provisioning, history, device, key, round_offset=offset)


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
        registry.repair_pointers(best_metric)  # none left: no pointer may name one
        return 0
    _same_settings(settings, checkpoint)
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


# what a resume may change: how long the run goes on, where and how patiently it runs
RESUMABLE_KEYS = ("federation.rounds", "device", "federation.strategy.round_timeout")


def resume_settings(cfg: Config) -> dict[str, Any]:
    """The settings the committed versions were made under, flat, as the checkpoint keeps
    them (less :data:`RESUMABLE_KEYS`)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    walk("", json.loads(json.dumps(to_dict(cfg))))  # JSON types, as read back
    return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS}


def _same_settings(settings: RunSettings, checkpoint: Checkpoint) -> None:
    """A resume continues the run its versions came from: another strategy, seed, data or
    privacy setting would mix versions made under different settings (a FedAdam run
    resumed as FedAvg dropped its moments without a word; 2 rounds without noise resumed
    with noise reported a finite epsilon for versions that had none)."""
    cfg = settings.load_config()
    now, before = resume_settings(cfg), checkpoint.settings
    if before is None:  # a checkpoint from before settings were recorded
        if cfg.federation.privacy.dp == "off":
            return
        changed = ["federation.privacy (unrecorded)"]
    else:
        changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6
                                          else "")
        raise ConfigError(
            f"run directory {settings.run_dir} was started with other settings ({shown} "
            "differ): resuming would mix versions made under different settings (and report a "
            "privacy budget that does not describe those already published); resume with the "
            "same config and overrides (only federation.rounds, device and the round timeout "
            "may change) or start a new run")


class FederationRounds(logging.Filter):
    """Flower's "[ROUND i/n]" counts the rounds of this start; after a resume, say the
    federation's round (i + rounds done before) of its total."""

    def __init__(self, offset: int, total: int) -> None:
        super().__init__()
        self.offset, self.total = offset, total

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "[ROUND %s/%s]" and isinstance(record.args, tuple) \
                and len(record.args) == 2:
            record.args = (int(record.args[0]) + self.offset, self.total)  # type: ignore[call-overload]
        return True


def reply_checks(cfg: Config) -> ValidationConfig:
    """`federation.validation`, except under differential privacy: there an update is not
    excluded by its norm against the round's (10 x the median, or the absolute bound).
    Which hospital is excluded, and the norm in the reason, would publish something of one
    hospital's raw update, and a skipped round, outside the accountant. Clipping bounds each
    update instead: the server clips (`dp: server`); with `dp: client` each hospital clips,
    and an update above the clipping norm broke the protocol and is excluded."""
    v, privacy = cfg.federation.validation, cfg.federation.privacy
    if privacy.dp == "off":
        return v
    bound = privacy.clipping_norm * (1 + 1e-5) if privacy.dp == "client" else 0.0
    return replace(v, max_norm_ratio=0.0, max_update_norm=bound)


def warn_if_warmup_spans_run(cfg: Config) -> None:
    """Say so when the head-only warm-up leaves no round for the rest of ``trainable``, or
    when validation rows may have been pretrained on."""
    for note in (warmup_note(cfg.model.trainable, cfg.federation.head_warmup_rounds,
                             cfg.federation.rounds), pretrain_overlap_note(cfg)):
        if note:
            log.warning(note)


def run_federation(grid: Grid, settings: RunSettings) -> Federation:
    """The whole run: rounds, checks, publication, delivery, site models, summary."""
    fed = prepare(grid, settings)
    cfg = fed.cfg
    state = fed.model.state_dict()
    initial = ArrayRecord({n: state[n].detach().clone() for n in fed.trainable})
    hint = settings.expected_nodes or cfg.federation.strategy.min_nodes
    strategy = build_strategy(cfg.federation.strategy, hint,
                              site_evaluation=not cfg.federation.evaluate_with_train)
    fed.strategy = strategy
    checkpoint = load_checkpoint(settings.run_dir) if fed.round_offset else None
    if checkpoint is not None:
        restore_strategy(strategy, checkpoint)
        count_rounds_from(strategy, fed.round_offset)
    strategy = wrap_privacy(strategy, cfg.federation.privacy,
                            sampled_per_round(cfg.federation.strategy, hint))
    remaining = max(cfg.federation.rounds - fed.round_offset, 0)
    fed.rounds_this_start = remaining
    round_config = ConfigRecord({rk.BACKBONE_SHA256: fed.grid.payload.sha256,
                                 rk.ROUND_OFFSET: fed.round_offset,
                                 rk.EVALUATE_WITH_TRAIN: int(cfg.federation.evaluate_with_train)})
    log.info("federated run: %s, %d rounds, strategy %s, trainable %s (%d tensors), "
             "validation: %s", cfg.name, cfg.federation.rounds, cfg.federation.strategy.name,
             cfg.model.trainable, len(fed.trainable), fed.heldout.label)
    warn_if_warmup_spans_run(cfg)
    rounds = FederationRounds(fed.round_offset, cfg.federation.rounds)
    logging.getLogger("flwr").addFilter(rounds)
    try:
        strategy.start(
            grid=fed.grid, initial_arrays=initial, num_rounds=remaining,
            timeout=cfg.federation.strategy.round_timeout, train_config=round_config,
            evaluate_config=ConfigRecord({rk.BACKBONE_SHA256: fed.grid.payload.sha256,
                                          rk.ROUND_OFFSET: fed.round_offset}),
            evaluate_fn=fed.evaluate_round,
        )
    finally:
        logging.getLogger("flwr").removeFilter(rounds)
    if not fed.registry.versions():
        raise RunStopped("no global model was published")
    fed.finish(extra=privacy_summary(cfg, max(fed.registry.versions()), hint))
    return fed
