"""What a bundle's manifest says, and how to rebuild a model and its preprocessing from it.

The manifest is a plain JSON dict (see DESIGN.md, "The model bundle"). Writing and signing it is
:mod:`common.bundle`'s job; this module decides its content.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common.config import Config, to_dict
from common.data.federated import DataSpec
from common.data.normalise import Normaliser
from common.data.schema import Schema
from common.models import SplitModel, build_model_from_args

MANIFEST_KIND = "medfed-model"

INTENDED_USE = (
    "Decision support for trained clinicians on data that matches the preprocessing schema; "
    "not a diagnosis on its own. Validate on local data before clinical use."
)


def make_manifest(
    cfg: Config,
    spec: DataSpec,
    normaliser: Normaliser,
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
            # `site`: each hospital normalises with its own train-split statistics; the
            # statistics stored here (the source train split) are used by `bundle` mode and
            # by `predict` when a site has no statistics of its own.
            "normalisation": {"mode": cfg.federation.data.normalisation, **normaliser.to_dict()},
        },
        "metrics": metrics,
        "sites": sites,
        "intended_use": INTENDED_USE,
        "config": to_dict(cfg),
    }


def model_from_manifest(manifest: dict[str, Any]) -> SplitModel:
    """Build the (untrained) model the manifest describes."""
    return build_model_from_args(manifest["model"])


def normaliser_from_manifest(manifest: dict[str, Any]) -> Normaliser:
    """The normalisation statistics stored in the bundle."""
    norm = dict(manifest["preprocessing"]["normalisation"])
    norm.pop("mode", None)
    return Normaliser.from_dict(norm)


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
