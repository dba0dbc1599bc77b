"""A hospital's local train/test split, read through the bundle's preprocessing spec.

Simulation: the node's share of the configured source (partition-id of Flower's node config).
Deployment: the hospital's own file (`data-path`), validated against the bundle's schema.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config, DataConfig, from_dict
from common.data.csv_source import read_csv_checked
from common.data.federated import FederatedData, SiteSplit, load_federated, split_site
from common.data.medmnist import NPZ_ERRORS, npz_problem, to_nchw
from common.data.normalise import Normaliser
from common.data.schema import DataError, encode
from common.manifest import normaliser_from_manifest, spec_from_manifest


@functools.lru_cache(maxsize=4)
def _federated(data_cfg: DataConfig, seed: int, norm_json: str) -> FederatedData:
    # A simulation worker serves many virtual hospitals; building the partition once per
    # worker process instead of once per message keeps 1000-hospital runs cheap.
    return load_federated(data_cfg, Normaliser.from_dict(json.loads(norm_json)), seed=seed)


def simulated_site(cfg: Config, manifest: dict[str, Any], partition_id: int) -> SiteSplit:
    """The split of simulated hospital `partition_id`."""
    norm_json = json.dumps(normaliser_from_manifest(manifest).to_dict(), sort_keys=True)
    data = _federated(cfg.federation.data, cfg.seed, norm_json)
    if not 0 <= partition_id < len(data.sites):
        raise DataError(
            f"simulated node partition-id {partition_id} has no site: the data config defines "
            f"{len(data.sites)} sites (set --hospitals to the number of simulated nodes)"
        )
    return data.sites[partition_id]


def _read_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files or "labels" not in npz.files:
                raise DataError(f"{path}: expected arrays 'images' and 'labels', "
                                f"found {sorted(npz.files)}")
            images, labels = npz["images"], npz["labels"].reshape(-1)
    except NPZ_ERRORS as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable npz file: {npz_problem(err)}") from err
    return to_nchw(images, str(path)), labels.astype(np.int64)


def _hospital_raw(path: Path, manifest: dict[str, Any]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    spec = spec_from_manifest(manifest)
    data_cfg = from_dict(manifest["config"]).federation.data
    if spec.kind == "tabular":
        if spec.schema is None:
            raise DataError(f"bundle has no tabular schema to read {path}")
        frame = read_csv_checked(path, spec.schema, require_label=True)
        x, y = encode(frame, spec.schema, str(path))
        if y is None:
            raise DataError(f"{path}: label column '{spec.schema.label}' is missing")
    else:
        x, y = _read_images(path)
        if tuple(x.shape[1:]) != tuple(spec.input_shape):
            raise DataError(f"{path}: images have shape {tuple(x.shape[1:])}, the model expects "
                            f"{tuple(spec.input_shape)}")
    return split_site(x, y, data_cfg.test_fraction, data_cfg.split_seed)


def hospital_normaliser(path: Path, manifest: dict[str, Any]) -> Normaliser:
    """The statistics this hospital's inputs are normalised with (never sent anywhere)."""
    if from_dict(manifest["config"]).federation.data.normalisation == "site":
        return Normaliser.fit(_hospital_raw(path, manifest)[0])
    return normaliser_from_manifest(manifest)


def hospital_site(path: Path, name: str, manifest: dict[str, Any]) -> SiteSplit:
    """A deployed hospital's own data file, split and normalised as the run's config says."""
    x_tr, y_tr, x_te, y_te = _hospital_raw(path, manifest)
    norm = hospital_normaliser(path, manifest)
    return SiteSplit(name, norm.apply(x_tr), y_tr, norm.apply(x_te), y_te)


def fingerprint(site: SiteSplit) -> str:
    """Hash of the site's arrays: part of the feature-cache key (never sent anywhere)."""
    h = hashlib.sha256()
    for arr in (site.x_train, site.y_train, site.x_test, site.y_test):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
