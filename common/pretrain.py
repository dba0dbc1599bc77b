"""Central pretraining of backbone + head on a source dataset (`medfed pretrain`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from common.bundle import write_bundle
from common.config import Config, DataConfig
from common.contrastive import simclr, to_channels
from common.data.federated import data_key_prefix, natural_sites
from common.data.medmnist import DATASETS, load_medmnist_split
from common.data.preprocess import SiteStats
from common.data.schema import DataError
from common.data.splits import TEST_LABEL, DataSpec, SiteSplit
from common.device import resolve_device, seed_everything
from common.manifest import json_metrics, make_manifest
from common.models import build_model, model_args, set_trainable, split_state
from common.training import evaluate, train_local

log = logging.getLogger("medfed.pretrain")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation",
               "test": "test"}


@dataclass(frozen=True)
class SourceData:
    """The pretraining cohort: its natural sites (raw, three splits) and what to train on."""

    spec: DataSpec
    sites: tuple[SiteSplit, ...]
    split: str  # train | validation | test: the split pretraining fits

    def pooled(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw x, y of one split over all source sites."""
        parts = [s.split(which) for s in self.sites]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

    def name(self, source: DataConfig) -> str:
        """e.g. `heart:cleveland:train`, `csv:hospital_a,hospital_b:train` or
        `medmnist/pneumonia:all:train` (which MedMNIST set: a model card must say)."""
        kind = f"medmnist/{source.medmnist}" if source.source == "medmnist" else source.source
        return f"{kind}:{','.join(s.name for s in self.sites)}:{self.split}"


def load_source(cfg: Config) -> SourceData:
    """Read and check the pretraining cohort (before any key or file is created)."""
    source = cfg.pretrain.data
    with data_key_prefix("pretrain.data"):
        if cfg.pretrain.split not in SPLIT_NAMES:
            raise DataError(f"config key 'pretrain.split' must be train, validation or test, "
                            f"got {cfg.pretrain.split!r}")
        spec, sites = natural_sites(source)
    data = SourceData(spec, tuple(sites), SPLIT_NAMES[cfg.pretrain.split])
    _check_classes(data.pooled(data.split)[1], spec, source, data.split)
    return data


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


def contrastive_images(cfg: Config, spec: DataSpec) -> list[np.ndarray]:
    """Raw train-split images of ``pretrain.contrastive.also_medmnist``, in the source's
    channels (an empty list unless the objective is simclr)."""
    if cfg.pretrain.objective != "simclr":
        return []
    out = []
    for i, name in enumerate(cfg.pretrain.contrastive.also_medmnist):
        where = f"config key 'pretrain.contrastive.also_medmnist[{i}]' ({name})"
        x_train, _, _ = load_medmnist_split(name, "train")  # labels unused
        try:
            images = to_channels(x_train, spec.input_shape[0], where)
        except ValueError as err:
            raise DataError(str(err)) from err
        if images.shape[1:] != tuple(spec.input_shape):
            raise DataError(f"{where}: images of shape {list(images.shape[1:])} cannot join "
                            f"the source's {list(spec.input_shape)}")
        out.append(images)
    return out


def source_name(cfg: Config, data: SourceData) -> str:
    """What the backbone learnt from, e.g. `medmnist/pneumonia:all:train` or, by SimCLR,
    `medmnist/pneumonia:all:train+simclr(medmnist/retina:train:grey)` (a model card says)."""
    name = data.name(cfg.pretrain.data)
    if cfg.pretrain.objective != "simclr":
        return name
    channels = data.spec.input_shape[0]

    def converted(name: str) -> str:  # the set's own channels, or what they became
        if DATASETS[name][2] == channels:
            return ""
        return ":grey" if channels == 1 else f":{channels}-channel"

    also = ",".join(f"medmnist/{n}:train{converted(n)}"
                    for n in cfg.pretrain.contrastive.also_medmnist)
    return f"{name}+simclr" + (f"({also})" if also else "")


def pretrain(
    cfg: Config, out: Path, signing_key: Ed25519PrivateKey, replace: bool = False,
    data: SourceData | None = None,
) -> dict[str, Any]:
    """Train the model on the source split and write a signed bundle (version 0).

    `supervised`: backbone and head on the source's labels. `simclr`: the backbone by the
    contrastive stage (with the `also_medmnist` images), then a fresh head alone on the
    labels. Imputation and normalisation statistics come from the source's training split
    (and the contrastive images) and are stored in the bundle; the source's validation split
    is never trained on (the server's `source-validation` check uses it). Returns the written
    manifest.
    """
    data = data or load_source(cfg)
    extra = contrastive_images(cfg, data.spec)  # read (and checked) before any training
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    spec = data.spec
    x_raw, y = data.pooled(data.split)
    # the statistics the bundle carries are those of every image the backbone learnt from
    stats = SiteStats.fit(np.concatenate([x_raw, *extra]) if extra else x_raw, spec.schema,
                          where=f"pretraining {data.split} split")
    x = stats.apply(x_raw)

    args = model_args(cfg.model.family, spec.input_shape, spec.num_classes, cfg.model)
    model = build_model(cfg.model.family, spec.input_shape, spec.num_classes, cfg.model)
    set_trainable(model, "all")
    if cfg.pretrain.objective == "simclr":
        images = np.concatenate([x, *(stats.apply(e) for e in extra)]) if extra else x
        loss = simclr(model, images, cfg.pretrain.contrastive, cfg.seed, device)
        log.info("contrastive stage on %d images: final loss %.4f", len(images), loss)
        # a fresh head on the learnt features, fitted alone: the labels must not reshape them
        model.head = nn.Linear(model.feature_dim, spec.num_classes)
        result = train_local(model, x, y, cfg.pretrain.optim, "head", device, cfg.seed)
    else:
        result = train_local(model, x, y, cfg.pretrain.optim, "all", device, cfg.seed)
    log.info("pretrained on %d examples: final loss %.4f", result.num_examples, result.loss)

    metrics: dict[str, Any] = {}
    for which in ("train", "validation", "test"):
        x_s, y_s = data.pooled(which)
        part: dict[str, Any] = dict(evaluate(model, stats.apply(x_s), y_s, device))
        if which == "test":
            part["label"] = TEST_LABEL
        metrics[f"source-{which}"] = part

    backbone, head = split_state(model)
    manifest = make_manifest(
        cfg, spec, stats, args, version=0, round_num=0, strategy=None,
        metrics=json_metrics(metrics), sites=[], source=source_name(cfg, data),
    )
    return write_bundle(
        out, backbone=backbone, head=head, manifest=manifest, signing_key=signing_key,
        replace=replace,
    )
