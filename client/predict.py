"""`medfed predict`: verified bundle + validated input -> one row of probabilities per input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import atomic_write_text
from common.bundle import load_bundle
from common.data.csv_source import read_csv_checked
from common.data.medmnist import load_image_file
from common.data.normalise import Normaliser
from common.data.schema import DataError, encode
from common.device import resolve_device
from common.manifest import model_from_manifest, normaliser_from_manifest, spec_from_manifest
from common.models import load_state
from common.signing import load_public_key
from common.training import predict_proba

SITE_STATS = "site_stats.json"  # a hospital's own normalisation statistics, next to its models


def _normaliser(model_dir: Path, manifest: dict[str, Any], stats: Path | None) -> Normaliser:
    """The hospital's own statistics when given or saved beside the model; else the bundle's."""
    path = stats or model_dir.parent / SITE_STATS
    if path.exists():
        try:
            return Normaliser.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError) as err:
            raise DataError(f"normalisation statistics {path} are malformed") from err
    return normaliser_from_manifest(manifest)


def read_inputs(data: Path, manifest: dict[str, Any]) -> np.ndarray:
    """The model inputs in `data`, validated against the manifest (CSV schema or image shape)."""
    spec = spec_from_manifest(manifest)
    if spec.kind == "tabular":
        if spec.schema is None:
            raise DataError("the bundle has no tabular schema")
        frame = read_csv_checked(data, spec.schema, require_label=False,
                                 keep=tuple(c for c in ("id",) if _has_column(data, c)))
        x, _ = encode(frame.drop(columns=[c for c in ("id",) if c in frame.columns]),
                      spec.schema, str(data))
        return x
    x = load_image_file(data)
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise DataError(f"{data}: images have shape {tuple(x.shape[1:])}, the model expects "
                        f"{tuple(spec.input_shape)}")
    return x


def _has_column(path: Path, name: str) -> bool:
    try:
        with path.open(encoding="utf-8-sig") as fh:
            return name in [h.strip() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError):
        return False  # read_csv_checked reports the real problem


def predict(model_dir: Path, data: Path, out: Path, public_key: Path | None = None,
            device: str = "auto", stats: Path | None = None) -> dict[str, Any]:
    """Write `out` (CSV: row, predicted label, one probability column per class)."""
    pub = load_public_key(public_key) if public_key else None
    bundle = load_bundle(model_dir, pub)
    manifest = bundle.manifest
    model = model_from_manifest(manifest)
    load_state(model, {**bundle.backbone, **bundle.head}, where=str(model_dir), complete=True)
    x = _normaliser(model_dir, manifest, stats).apply(read_inputs(data, manifest))
    proba = predict_proba(model, x, resolve_device(device))
    labels = list(manifest["labels"])
    predicted = proba.argmax(axis=1)

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "predicted", *[f"p_{name}" for name in labels]])
    for i, (k, p) in enumerate(zip(predicted, proba, strict=True)):
        writer.writerow([i, labels[int(k)], *[f"{v:.6f}" for v in p]])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buf.getvalue())
    counts = {name: int((predicted == k).sum()) for k, name in enumerate(labels)}
    return {"rows": len(x), "counts": counts, "version": manifest.get("version"),
            "mean_probability": {name: float(proba[:, k].mean()) for k, name in enumerate(labels)}}
