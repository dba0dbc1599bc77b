"""Central pretraining of backbone + head on a source dataset (`medfed pretrain`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.bundle import write_bundle
from common.config import Config, DataConfig
from common.data.federated import DataSpec, load_source_split
from common.data.normalise import Normaliser
from common.data.schema import DataError
from common.device import resolve_device, seed_everything
from common.manifest import json_metrics, make_manifest
from common.models import build_model, model_args, set_trainable, split_state
from common.training import evaluate, train_local

log = logging.getLogger("medfed.pretrain")


def _check_classes(y: np.ndarray, spec: DataSpec, source: DataConfig, split: str) -> None:
    """A one-class source would give a head that always answers that class, with no warning.

    (A federated site with one class is fine: other sites bring the other class.)
    """
    present = np.unique(y)
    if len(present) >= 2:
        return
    files = f" ({', '.join(source.csv_paths)})" if source.source == "csv" else ""
    only = f"only class '{spec.labels[int(present[0])]}'" if len(present) else "no rows"
    raise DataError(
        f"config key 'pretrain.data': the {split} split of source '{source.source}'{files} has "
        f"{only} in {len(y)} rows; pretraining needs examples of at least two classes"
    )


def pretrain(
    cfg: Config, out: Path, signing_key: Ed25519PrivateKey, replace: bool = False
) -> dict[str, Any]:
    """Train the whole model on the source split and write a signed bundle (version 0).

    Normalisation statistics come from the source train split and are stored in the bundle.
    Returns the written manifest.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    source = cfg.pretrain.data
    x_raw, y, spec = load_source_split(source, cfg.pretrain.split)
    _check_classes(y, spec, source, cfg.pretrain.split)
    normaliser = Normaliser.fit(x_raw)
    x = normaliser.apply(x_raw)

    args = model_args(cfg.model.family, spec.input_shape, spec.num_classes, cfg.model)
    model = build_model(cfg.model.family, spec.input_shape, spec.num_classes, cfg.model)
    set_trainable(model, "all")
    result = train_local(model, x, y, cfg.pretrain.optim, "all", device, cfg.seed)
    log.info("pretrained on %d examples: final loss %.4f", result.num_examples, result.loss)

    metrics: dict[str, Any] = {"source-train": evaluate(model, x, y, device)}
    try:
        x_test, y_test, _ = load_source_split(source, "test")
        metrics["source-test"] = evaluate(model, normaliser.apply(x_test), y_test, device)
    except ValueError as err:  # a source without a test split still pretrains
        log.warning("no source test split: %s", err)

    backbone, head = split_state(model)
    site_names = list(source.sites) or [
        source.medmnist if source.source == "medmnist" else source.source]
    manifest = make_manifest(
        cfg,
        spec,
        normaliser,
        args,
        version=0,
        round_num=0,
        strategy=None,
        metrics=json_metrics(metrics),
        sites=[],
        source=f"{source.source}:{','.join(site_names)}:{cfg.pretrain.split}",
    )
    return write_bundle(
        out, backbone=backbone, head=head, manifest=manifest, signing_key=signing_key,
        replace=replace,
    )
