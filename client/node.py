"""What a hospital node does with each message, as plain functions over `common/`.

The ClientApp handlers (`client/client_app.py`) only unpack messages and call these. Nothing
here puts patient values into a reply: replies hold trainable tensors, counts, scalar metrics
and hashes; error texts hold counts, shapes and names.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import RecordDict

from client.cache import BackboneCache, FeatureCache, federation_key
from client.faults import attack_of, maybe_fail, maybe_poison, tamper
from client.local_data import fingerprint, hospital_site, simulated_site, simulated_site_name
from common import records as rk
from common.atomic import atomic_dir, atomic_write_text
from common.bundle import (
    BACKBONE_FILE,
    HEAD_FILE,
    SITE_STATS_FILE,
    BundleError,
    assemble_bundle,
    sha256_bytes,
    state_from_bytes,
    state_to_bytes,
)
from common.config import Config
from common.data.schema import DataError
from common.data.splits import SiteSplit
from common.device import resolve_device, seed_everything
from common.manifest import model_from_manifest
from common.models import (
    SplitModel,
    frozen_features,
    frozen_prefix_blocks,
    load_state,
    set_trainable,
    split_state,
)
from common.names import printable, sanitise_name
from common.personalise import SiteModel, personalise
from common.scoring import OperatingPoint, score_splits
from common.settings import NodeSettings, RunSettings
from common.signing import verify
from common.training import TrainResult, round_trainable, train_local

BUILT_MODELS = 8  # backbones kept built per process
# (backbone sha256, trainable) -> (the verified bytes it was built from, model, trainable
# names, scratch copy for scoring); BackboneCache.load hands out the same bytes object until
# the file changes
_built_models: dict[tuple[str, str], tuple[bytes, SplitModel, list[str], SplitModel]] = {}

SITE_MODEL_DIR = "personalised"  # the site's own signed model, in its work directory
PENDING_DIR = "personalised.pending"  # staged until the server's signed manifest arrives


class DataRefused(ValueError):
    """This hospital's data does not match the model: the text is what the server sees."""


def refuse_data(node: Node, err: DataError) -> DataRefused:
    """Write the full sentence where `medfed client` looks, and a path-free one to send.

    The server sees column names and counts, never the file's path (which may name a
    patient group) nor a value.
    """
    full = str(err)
    sent = full
    for path in (node.settings.data_path, node.settings.test_path):
        if path is not None:
            sent = sent.replace(str(path), "its data file")
    try:
        node.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(node.workdir / rk.DATA_REFUSED_FILE,
                          json.dumps({"time": time.time(), "reason": full}) + "\n")
    except OSError:
        pass  # the server still learns it; the client then stops on the error reply
    return DataRefused(f"{rk.DATA_REFUSED}: {sent}")


@dataclass
class Node:
    """One hospital node for the duration of one message."""

    cfg: Config
    run: RunSettings
    settings: NodeSettings
    _site: SiteSplit | None = field(default=None, repr=False)
    # what one message looks up more than once (the node lives for one message)
    _workdir: Path | None = field(default=None, repr=False)
    _loaded: dict[str, tuple[bytes, dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def workdir(self) -> Path:
        """Caches and models of this node; a simulated node's is named after its site."""
        if self._workdir is None:
            if self.settings.workdir is not None:
                self._workdir = self.settings.workdir
            else:
                pid = self.settings.partition_id if self.settings.partition_id is not None else 0
                name = simulated_site_name(self.cfg.federation.data, self.cfg.seed, pid)
                self._workdir = self.run.run_dir / "nodes" / sanitise_name(name)
        return self._workdir

    @property
    def backbones(self) -> BackboneCache:
        """The node's backbone cache."""
        return BackboneCache(self.workdir / "backbones", self.settings.signing_pub)

    @property
    def device(self) -> torch.device:
        """`device` from node config, else the experiment config."""
        return resolve_device(self.settings.device or self.cfg.device)

    def model(self, backbone_sha: str, scoring: bool = False
              ) -> tuple[SplitModel, dict[str, Any], list[str]]:
        """Model with the cached backbone; returns (model, manifest, trainable names).

        Built once per process and backbone (hospitals simulated in one process share it:
        equal verified bytes); each message gets its own copy to train. `scoring` hands out
        the process's one scratch copy instead: only for a forward pass after the caller
        loads every trainable tensor into it (what scoring leaves alone is never written)."""
        if backbone_sha not in self._loaded:  # verified (or its files' stamps) once a message
            self._loaded[backbone_sha] = self.backbones.load(backbone_sha)
        file_bytes, manifest = self._loaded[backbone_sha]
        key = (backbone_sha, self.cfg.model.trainable)
        built = _built_models.get(key)
        if built is None or built[0] != file_bytes:
            model = model_from_manifest(manifest)
            load_state(model, state_from_bytes(file_bytes, "cached backbone"),
                       where="cached backbone")
            names = set_trainable(model, self.cfg.model.trainable)
            built = (file_bytes, model, names, copy.deepcopy(model))
            _built_models[key] = built
            while len(_built_models) > BUILT_MODELS:
                _built_models.pop(next(iter(_built_models)))
        if scoring:
            return built[3], manifest, list(built[2])
        return copy.deepcopy(built[1]), manifest, list(built[2])

    def site(self, manifest: dict[str, Any]) -> SiteSplit:
        """This node's local splits, preprocessed with its own statistics."""
        if self._site is not None:
            return self._site
        if self.settings.partition_id is not None:
            self._site = simulated_site(self.cfg.federation.data, self.cfg.seed, manifest,
                                        self.settings.partition_id)
        elif self.settings.data_path is None:
            raise DataError("node config has neither 'partition-id' (simulation) nor "
                            "'data-path' (deployment)")
        else:
            try:
                self._site = hospital_site(self.settings.data_path, self.site_name(), manifest,
                                           self.cfg.federation.data, self.settings.test_path)
            except DataError as err:
                raise refuse_data(self, err) from err
        return self._site

    def site_name(self, site: SiteSplit | None = None) -> str:
        """The hospital's name (node config wins; simulation uses the data's site name)."""
        if self.settings.site_name:
            return self.settings.site_name
        return site.name if site is not None else "unknown"

    def train_inputs(self, model: SplitModel, site: SiteSplit, backbone_sha: str
                     ) -> tuple[np.ndarray, bool]:
        """(train inputs, features_cached): cached frozen features when possible."""
        trainable = self.cfg.model.trainable
        # augmented images must pass through the frozen prefix each step: nothing to cache
        if (frozen_prefix_blocks(model, trainable) == 0
                or self.cfg.federation.local.augment != "none"):
            return site.x_train, False
        cache = FeatureCache(self.workdir / "features")
        key = FeatureCache.key(backbone_sha, trainable, fingerprint(site))
        hit = cache.get(key)
        if hit is not None:
            return hit, True
        with torch.no_grad():
            train = frozen_features(model, torch.from_numpy(site.x_train), trainable).numpy()
        cache.put(key, train)
        return train, True

    def tampered(self, kind: str, content: RecordDict) -> RecordDict:
        """`content` as a malicious test hospital would send it (client/faults.py)."""
        faults = self.cfg.federation.faults
        attack = attack_of(faults, self.settings.partition_id, self.settings.num_partitions,
                           self.settings.attack)
        if attack is None:
            return content
        pid = self.settings.partition_id or 0

        def other() -> str:
            return simulated_site_name(self.cfg.federation.data, self.cfg.seed,
                                       1 if pid == 0 else 0)

        return tamper(attack, kind, content, faults.attack_value, other)

    def seed(self, server_round: int) -> int:
        """A different but reproducible seed per node and round."""
        who = f"{self.settings.partition_id}|{self.settings.site_name}"
        text = f"{self.cfg.seed}|{who}|{server_round}"
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def declared_rows(node: Node, backbone_sha: str) -> tuple[dict[str, int], str]:
    """Rows per split this site declares when provisioned (the server logs and bounds them),
    and the site's name."""
    _, manifest = node.backbones.load(backbone_sha)
    site = node.site(manifest)
    return site.sizes(), node.site_name(site)


NAMES_SHOWN = 3  # tensor names quoted in an error; the rest are counted


def _some(names: list[str], what: str) -> str:
    """A few names, each short and printable, and how many there are: the names come from
    the server, which could send thousands of long ones into the hospital's log."""
    shown = ", ".join(printable(repr(n), 80) for n in names[:NAMES_SHOWN])
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return f"{len(names)} {what} [{shown}{more}]"


def check_arrays(received: dict[str, torch.Tensor], expected: list[str]) -> None:
    """The server must send exactly the trainable tensors."""
    if set(received) != set(expected):
        extra = sorted(set(received) - set(expected))
        missing = sorted(set(expected) - set(received))
        raise ValueError("message tensors do not match the trainable set: "
                         f"{_some(extra, 'unexpected')}, {_some(missing, 'missing')}")


def _global_model(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str, where: str,
                  scoring: bool = False) -> tuple[SplitModel, dict[str, Any], list[str]]:
    model, manifest, names = node.model(backbone_sha, scoring)
    check_arrays(arrays, names)
    load_state(model, arrays, where=where)
    return model, manifest, names


def train(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str, server_round: int,
          proximal_mu: float) -> tuple[dict[str, torch.Tensor], TrainResult, str]:
    """Local training of the trainable tensors; returns (tensors, result, site name)."""
    faults, pid = node.cfg.federation.faults, node.settings.partition_id
    maybe_fail(faults, pid, node.settings.num_partitions, server_round)
    model, manifest, _ = _global_model(node, arrays, backbone_sha, "train message")
    site = node.site(manifest)
    trainable = round_trainable(node.cfg.model.trainable, node.cfg.federation.head_warmup_rounds,
                                server_round)
    if trainable == node.cfg.model.trainable:
        x_train, cached = node.train_inputs(model, site, backbone_sha)
    else:  # head warm-up: the received backbone runs whole, so no cached prefix applies
        x_train, cached = site.x_train, False
    optim = replace(node.cfg.federation.local, proximal_mu=proximal_mu)
    seed = node.seed(server_round)
    seed_everything(seed)
    result = train_local(
        model, x_train, site.y_train, optim, trainable, node.device, seed,
        global_state=arrays if proximal_mu > 0 else None, features_cached=cached,
    )
    state = model.state_dict()
    # reply in the order received: Flower's fixedclipping_mod pairs tensors by position
    trained = {n: state[n].detach().cpu() for n in arrays}
    trained = maybe_poison(faults, pid, node.settings.num_partitions, arrays, trained)
    return trained, result, node.site_name(site)


def nan_for_none(metrics: dict[str, Any]) -> dict[str, float]:
    """Flower metric records hold numbers only: an undefined metric travels as NaN."""
    return {k: (math.nan if v is None else float(v)) for k, v in metrics.items()
            if v is None or isinstance(v, int | float)}


def evaluate_local(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str,
                   server_round: int = 0) -> tuple[dict[str, float], int, str]:
    """The received global model on the site's validation and test splits.

    Keys are `val-<metric>` and `test-<metric>`; the weight is the validation rows. Scored
    as `medfed evaluate` scores (float64, full forward), so reports and re-checks agree.
    """
    maybe_fail(node.cfg.federation.faults, node.settings.partition_id,
               node.settings.num_partitions, server_round)
    return score_received(node, arrays, backbone_sha, "evaluate message")


def score_received(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str, where: str
                   ) -> tuple[dict[str, float], int, str]:
    """`val-<metric>` and `test-<metric>` of the received global model, validation rows, and
    the site's name (an evaluate message, or a train message before it trains)."""
    model, manifest, _ = _global_model(node, arrays, backbone_sha, where, scoring=True)
    site = node.site(manifest)
    op = OperatingPoint()
    val, test = score_splits(model, [(site.x_val, site.y_val), (site.x_test, site.y_test)], op)
    metrics = {f"val-{k}": v for k, v in nan_for_none(val).items()}
    metrics.update({f"test-{k}": v for k, v in nan_for_none(test).items()})
    return metrics, len(site.y_val), node.site_name(site)


def personalise_site(node: Node, arrays: dict[str, torch.Tensor], backbone_sha: str
                     ) -> tuple[SiteModel, dict[str, str], str]:
    """Build this site's model from the final global one and stage its files.

    Returns the site model, the sha256 of each staged file (what the server signs), and the
    site name. The files wait in `<workdir>/personalised.pending/` until the signed manifest
    arrives (:func:`save_site_model`).
    """
    model, manifest, names = _global_model(node, arrays, backbone_sha, "adapt message")
    site = node.site(manifest)
    cfg = node.cfg
    seed = node.seed(10_000)
    seed_everything(seed)
    result = personalise(model, site, names, cfg.model.trainable, cfg.federation.adaptation,
                         cfg.federation.local, cfg.federation.operating_point, node.device, seed)
    load_state(model, result.state, where="site model")
    backbone, head = split_state(model)
    assert site.stats is not None  # node.site always preprocesses
    files = {BACKBONE_FILE: state_to_bytes(backbone), HEAD_FILE: state_to_bytes(head),
             SITE_STATS_FILE: site.stats.to_json().encode("utf-8")}
    pending = node.workdir / PENDING_DIR
    pending.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(pending, replace=True) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return result, {n: sha256_bytes(b) for n, b in files.items()}, node.site_name(site)


def _signing_key(node: Node) -> Ed25519PublicKey:
    """The federation's public key: every bundle a hospital keeps is verified with it."""
    return federation_key(node.settings.signing_pub, "models")


def save_site_model(node: Node, manifest_json: str, sig_hex: str) -> Path:
    """Complete the staged site model with the server's signed manifest, verified."""
    pending = node.workdir / PENDING_DIR
    if not pending.is_dir():
        raise BundleError("no staged site model to sign: the adapt step did not run here")
    files = {p.name: p.read_bytes() for p in sorted(pending.iterdir()) if p.is_file()}
    pub = _signing_key(node)
    final = node.workdir / SITE_MODEL_DIR
    assemble_bundle(final, files, manifest_json.encode("utf-8"), bytes.fromhex(sig_hex), pub,
                    replace=True)
    shutil.rmtree(pending, ignore_errors=True)
    return final


MAX_VERSION = 10**6  # model versions are filed as vNNNN; a larger number is not a real one


def _signed_manifest(pub: Ed25519PublicKey, manifest_json: str, sig_hex: str,
                     version: int) -> dict[str, Any]:
    """The manifest of a final model, verified, whose signed version is the claimed one.

    The version in the message only names the directory; without this check an old signed
    model sent under a newer number would overwrite that newer model (`replace=True`).
    """
    if not 0 <= version < MAX_VERSION:
        raise BundleError(f"the final model message claims version {version}, outside 0.."
                          f"{MAX_VERSION - 1}; refused")
    try:
        signature = bytes.fromhex(sig_hex)
    except ValueError as err:
        raise BundleError("the signature sent with the final model is not hex; refused") from err
    # the same bytes assemble_bundle checks again: nothing is written before this passes
    verify(pub, manifest_json.encode("utf-8"), signature, where="manifest of the final model")
    try:
        manifest = json.loads(manifest_json)
    except json.JSONDecodeError as err:
        raise BundleError("the manifest of the final model is not valid JSON; refused") from err
    signed = manifest.get("version") if isinstance(manifest, dict) else None
    if type(signed) is not int or signed != version:
        raise BundleError(f"the final model message claims version {version} but its signed "
                          f"manifest is version {printable(signed, 20)}; refused")
    if not isinstance(manifest.get("files"), dict) or BACKBONE_FILE not in manifest["files"]:
        raise BundleError(f"the signed manifest of the final model lists no {BACKBONE_FILE}; "
                          "refused")
    return dict(manifest)


def save_model(node: Node, version: int, manifest_json: str, sig_hex: str, head_bytes: bytes,
               backbone_bytes: bytes | None) -> Path:
    """Assemble the final global bundle in `<workdir>/models/vNNNN` and verify it.

    Beside it, `models/site_stats.json` holds this site's own statistics: `medfed predict`
    and `evaluate` need them for a bundle whose normalisation mode is `site`.
    """
    pub = _signing_key(node)
    manifest = _signed_manifest(pub, manifest_json, sig_hex, version)
    if backbone_bytes is None:
        backbone_bytes, _ = node.backbones.load(str(manifest["files"][BACKBONE_FILE]))
    final = node.workdir / "models" / f"v{version:04d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    assemble_bundle(final, {BACKBONE_FILE: backbone_bytes, HEAD_FILE: head_bytes},
                    manifest_json.encode("utf-8"), bytes.fromhex(sig_hex), pub, replace=True)
    site = node.site(manifest)
    assert site.stats is not None
    atomic_write_text(final.parent / SITE_STATS_FILE, site.stats.to_json())
    return final
