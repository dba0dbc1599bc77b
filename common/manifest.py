"""What a bundle's manifest says, and how to rebuild a model and its preprocessing from it.

The manifest is a plain JSON dict (see DESIGN.md, "The model bundle"). Writing and signing it is
:mod:`common.bundle`'s job; this module decides its content.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from common.config import Config, to_dict
from common.data.preprocess import SiteStats
from common.data.schema import DataError, Schema
from common.data.splits import DataSpec
from common.models import SplitModel, build_model_from_args

MANIFEST_KIND = "medfed-model"
# an uncalibrated model deciding at p(positive) > 0.5 (the arg-max for two classes)
DEFAULT_OPERATING_POINT: dict[str, Any] = {"temperature": 1.0, "threshold": 0.5,
                                           "rule": "fixed:0.5", "fitted_on": None}

INTENDED_USE = (
    "Decision support for trained clinicians on data that matches the preprocessing schema; "
    "not a diagnosis on its own. Validate on local data before clinical use."
)


def make_manifest(
    cfg: Config,
    spec: DataSpec,
    stats: SiteStats,
    model_args: dict[str, Any],
    *,
    version: int,
    round_num: int,
    strategy: str | None,
    metrics: dict[str, Any],
    sites: list[str],
    source: str,
) -> dict[str, Any]:
    """The manifest of a model version (files, hashes and signer are added by write_bundle)."""
    return {
        "kind": MANIFEST_KIND,
        "name": cfg.name,
        "version": version,
        "round": round_num,
        "strategy": strategy,
        "source": source,
        "model": model_args,
        "trainable": cfg.model.trainable,
        "labels": list(spec.labels),
        "preprocessing": {
            "kind": spec.kind,
            "input_shape": list(spec.input_shape),
            "feature_names": list(spec.feature_names),
            "schema": spec.schema.to_dict() if spec.schema is not None else None,
            # `site`: each hospital imputes and normalises with its own train-split statistics
            # (site_stats.json beside or inside its model); the statistics stored here (the
            # source train split) are what `bundle` mode uses, and a site's fallback for a
            # column it never observed.
            "normalisation": {"mode": cfg.federation.data.normalisation, **stats.to_dict()},
        },
        # how probabilities become decisions; sites fit their own on validation
        "operating_point": dict(DEFAULT_OPERATING_POINT),
        "metrics": metrics,
        "sites": sites,
        "intended_use": INTENDED_USE,
        "config": to_dict(cfg),
    }


def model_from_manifest(manifest: dict[str, Any]) -> SplitModel:
    """Build the (untrained) model the manifest describes."""
    return build_model_from_args(manifest["model"])


def stats_from_manifest(manifest: dict[str, Any]) -> SiteStats:
    """The preprocessing statistics stored in the bundle (the source's train split)."""
    return stats_from_normalisation(manifest["preprocessing"]["normalisation"])


def stats_from_normalisation(normalisation: dict[str, Any]) -> SiteStats:
    """:func:`stats_from_manifest` of the manifest's `preprocessing.normalisation` entry."""
    norm = dict(normalisation)
    norm.pop("mode", None)
    return SiteStats.from_dict(norm, where="the bundle's normalisation statistics")


def normalisation_mode(manifest: dict[str, Any]) -> str:
    """`site` (each hospital's own statistics) or `bundle` (the statistics stored here)."""
    return str(manifest["preprocessing"]["normalisation"].get("mode", "bundle"))


def spec_from_manifest(manifest: dict[str, Any]) -> DataSpec:
    """The data contract the model expects."""
    pre = manifest["preprocessing"]
    schema = Schema.from_dict(pre["schema"]) if pre.get("schema") else None
    labels = tuple(manifest["labels"])
    return DataSpec(
        kind=pre["kind"],
        input_shape=tuple(int(d) for d in pre["input_shape"]),
        num_classes=int(manifest["model"]["num_classes"]),
        labels=labels,
        feature_names=tuple(pre.get("feature_names", ())),
        schema=schema,
    )


def task_spec(manifest: dict[str, Any], declared: DataSpec | None,
              key: str = "federation.data") -> DataSpec:
    """The data contract of a federation fine-tuning the bundle of `manifest` on data that
    declares `declared` (None: the bundle's own task): the bundle's input and schema, with
    the declared label names, which every version published for the federation carries.

    A declared task of another image shape or class count than the model's is refused: the
    backbone could not read its images, or its head has one output per pretraining class.
    """
    spec = spec_from_manifest(manifest)
    if declared is None:
        return spec
    if tuple(declared.input_shape) != tuple(spec.input_shape) \
            or declared.num_classes != spec.num_classes:
        raise DataError(
            f"config key '{key}' names a task of {declared.num_classes} classes "
            f"({', '.join(declared.labels)}) on inputs of shape {tuple(declared.input_shape)},"
            f" but the bundle's model takes inputs of shape {tuple(spec.input_shape)} and has "
            f"{spec.num_classes} outputs ({', '.join(spec.labels)}): pretrain a bundle for "
            "this data")
    return dataclasses.replace(spec, labels=declared.labels)


def json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics with NaN (undefined, e.g. AUC on a one-class split) written as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float | np.floating) and not np.isfinite(value):
            return None
        if isinstance(value, np.generic):
            return value.item()
        return value

    return {k: clean(v) for k, v in metrics.items()}
