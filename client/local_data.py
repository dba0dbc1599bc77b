"""A hospital's local train / validation / test split, read through the bundle's spec.

Simulation: the node's share of the configured source (partition-id of Flower's node config).
Deployment: the hospital's own file (`data-path`, plus `test-path` when it keeps its test rows
apart), validated against the bundle's schema and split as the run's config says.
Either way the site's statistics (imputation, normalisation) are fitted on its training split
only, and travel with the :class:`~common.data.splits.SiteSplit` (`.stats`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from common.config import DataConfig, from_dict
from common.data.csv_source import has_column, read_csv_checked, site_from_frames
from common.data.federated import preprocess, raw_sites
from common.data.medmnist import read_labelled_npz
from common.data.schema import DataError
from common.data.splits import SiteSplit, three_way, with_validation
from common.manifest import spec_from_manifest, stats_from_manifest, stats_from_normalisation


def data_config(manifest: dict[str, Any]) -> DataConfig:
    """The data config a bundle's manifest records (the run that produced it)."""
    return from_dict(manifest["config"]).federation.data


SIMULATED_SITES_KEPT = 4096  # preprocessed simulated sites per process (each is small)


# A simulation worker serves every hospital in turn: the partition is built once per process
# (raw_sites is cached) and each node preprocesses only its own share, kept for the next
# message (a cache smaller than the federation would miss on every one, LRU over a cycle).
@functools.lru_cache(maxsize=SIMULATED_SITES_KEPT)
def _simulated(data_cfg: DataConfig, seed: int, partition_id: int, norm_json: str
               ) -> SiteSplit:
    spec, sites = raw_sites(data_cfg, seed)
    if not 0 <= partition_id < len(sites):
        raise DataError(
            f"simulated node partition-id {partition_id} has no site: the data config defines "
            f"{len(sites)} sites (set --hospitals to the number of simulated nodes)"
        )
    stats = stats_from_normalisation(json.loads(norm_json))
    return preprocess(sites[partition_id], spec, data_cfg.normalisation, stats)


def simulated_site(data_cfg: DataConfig, seed: int, manifest: dict[str, Any],
                   partition_id: int) -> SiteSplit:
    """The preprocessed split of simulated hospital `partition_id`."""
    # the manifest's statistics as the cache key: parsed only when the site is built
    norm_json = json.dumps(manifest["preprocessing"]["normalisation"], sort_keys=True)
    return _simulated(data_cfg, seed, partition_id, norm_json)


def simulated_site_name(data_cfg: DataConfig, seed: int, partition_id: int) -> str:
    """The data's name of simulated hospital `partition_id` (e.g. `cleveland`, `site-03`)."""
    _, sites = raw_sites(data_cfg, seed)
    if not 0 <= partition_id < len(sites):
        return f"node-{partition_id:04d}"
    return sites[partition_id].name


def _raw_hospital(path: Path, test_path: Path | None, name: str, manifest: dict[str, Any],
                  cfg: DataConfig) -> SiteSplit:
    """The hospital's rows in three splits, before any statistic is fitted."""
    spec = spec_from_manifest(manifest)
    if spec.kind == "tabular":
        if spec.schema is None:
            raise DataError(f"bundle has no tabular schema to read {path}")
        keep = (cfg.split_column,) if cfg.split_column and has_column(path, cfg.split_column) \
            else ()
        local = cfg if keep else _without_split_column(cfg)
        frame = read_csv_checked(path, spec.schema, require_label=True, keep=keep)
        test = read_csv_checked(test_path, spec.schema) if test_path is not None else None
        return site_from_frames(name, str(path), frame, test, spec.schema, local)
    x, y = read_labelled_npz(path)
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise DataError(f"{path}: images have shape {tuple(x.shape[1:])}, the model expects "
                        f"{tuple(spec.input_shape)}")
    if test_path is None:
        return three_way(name, x, y, cfg.test_fraction, cfg.validation_fraction, cfg.split_seed)
    x_te, y_te = read_labelled_npz(test_path)
    return with_validation(name, x, y, x_te, y_te, cfg.validation_fraction, cfg.split_seed)


def _without_split_column(cfg: DataConfig) -> DataConfig:
    from dataclasses import replace

    return replace(cfg, split_column="")


def hospital_site(path: Path, name: str, manifest: dict[str, Any], data_cfg: DataConfig,
                  test_path: Path | None = None) -> SiteSplit:
    """A deployed hospital's own data, split and preprocessed as the run's `data_cfg` says.

    The bundle's manifest gives the schema and the statistics a site falls back on.
    """
    spec = spec_from_manifest(manifest)
    raw = _raw_hospital(Path(path), test_path, name, manifest, data_cfg)
    return preprocess(raw, spec, data_cfg.normalisation, stats_from_manifest(manifest))


def fingerprint(site: SiteSplit) -> str:
    """Hash of the site's arrays: part of the feature-cache key (never sent anywhere)."""
    h = hashlib.sha256()
    for arr in (site.x_train, site.y_train, site.x_val, site.y_val, site.x_test, site.y_test):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
