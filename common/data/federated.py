"""From a :class:`DataConfig` to hospitals: natural sites or simulated ones, preprocessed.

Every source module returns its natural sites raw, already in train / validation / test
(tables encoded but not imputed or normalised, images float32 in [0, 1], NCHW). This module
optionally re-partitions them over simulated hospitals and then fits each site's
:class:`~common.data.preprocess.SiteStats` on its training split only, so partitioning and
preprocessing work the same for every source.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import DataConfig, show
from common.data.partition import (
    parse_partition,
    partition_dirichlet,
    partition_iid,
    partition_like,
    partition_quantity,
    shares_of,
)
from common.data.preprocess import SiteStats
from common.data.schema import DataError
from common.data.splits import DataSpec, SiteSplit, check_fraction, sub_seed

SOURCES = ("heart", "medmnist", "csv", "synthetic")
_DATA_KEY = re.compile(r"'data\.")
NORMALISATIONS = ("site", "bundle")


@dataclass
class FederatedData:
    """The hospitals of one run, each preprocessed with its own (or the bundle's) statistics."""

    spec: DataSpec
    sites: list[SiteSplit]


@contextmanager
def data_key_prefix(prefix: str) -> Iterator[None]:
    """Name config keys in data errors by their place in the file (`pretrain.data.csv_paths`).

    The data layer only knows a :class:`DataConfig`, so its messages say `data.KEY`.
    """
    try:
        yield
    except DataError as err:
        text = str(err)
        if "'data." not in text:
            raise
        raise DataError(_DATA_KEY.sub(f"'{prefix}.", text)) from err


def check_data_config(cfg: DataConfig) -> None:
    """Values of a data config that name nothing or cannot split anything."""
    if cfg.source not in SOURCES:
        raise DataError(f"config key 'data.source' must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.normalisation not in NORMALISATIONS:
        raise DataError(
            f"config key 'data.normalisation' must be one of {NORMALISATIONS}, "
            f"got {cfg.normalisation!r}"
        )
    check_fraction("data.test_fraction", cfg.test_fraction)
    check_fraction("data.validation_fraction", cfg.validation_fraction)
    if cfg.num_sites < 0:
        raise DataError(f"config key 'data.num_sites' must be 0 or more, got {cfg.num_sites}")
    _check_labels(cfg.labels)
    if cfg.source == "csv":
        if not cfg.csv_schema:
            raise DataError("config key 'data.csv_schema' is empty; give the schema YAML file")
        if not cfg.csv_paths:
            raise DataError("config key 'data.csv_paths' is empty; list one CSV file per site")


MAX_LABEL = 64  # characters of a class name (a prediction column is `p_<name>`)


def _check_labels(labels: tuple[str, ...]) -> None:
    for i, name in enumerate(labels):
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_LABEL \
                or not name.isprintable():
            raise DataError(f"config key 'data.labels[{i}]' must be a class name of 1 to "
                            f"{MAX_LABEL} printable characters, got {show(name)}")
    if len(set(labels)) != len(labels):
        twice = next(n for n in labels if labels.count(n) > 1)
        raise DataError(f"config key 'data.labels' names class {twice!r} twice")


def named(spec: DataSpec, labels: tuple[str, ...], key: str = "data.labels",
          holder: str = "the data has") -> DataSpec:
    """`spec` with the class names `labels` (empty: unchanged); one per class, in order.
    The names themselves were checked with the config (:func:`check_data_config`)."""
    if not labels:
        return spec
    if len(labels) != spec.num_classes:
        raise DataError(
            f"config key '{key}' names {len(labels)} classes ({', '.join(labels)}) but "
            f"{holder} {spec.num_classes} ({', '.join(spec.labels)}): give one name per class, "
            "in class-index order")
    return dataclasses.replace(spec, labels=tuple(labels))


def _select(sites: list[SiteSplit], wanted: tuple[str, ...], source: str) -> list[SiteSplit]:
    names = [s.name for s in sites]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise DataError(
            f"config key 'data.sites' names unknown {source} site {unknown[0]!r} (valid: {shown})"
        )
    return [s for s in sites if not wanted or s.name in wanted]


def natural_sites(cfg: DataConfig) -> tuple[DataSpec, list[SiteSplit]]:
    """The source's own hospitals (restricted to `cfg.sites`), raw, in three splits; the
    spec carries `cfg.labels` when given."""
    spec, sites = _source_sites(cfg)
    return named(spec, cfg.labels), sites


def _source_sites(cfg: DataConfig) -> tuple[DataSpec, list[SiteSplit]]:
    check_data_config(cfg)
    # imported here: each source is loaded only when asked for
    if cfg.source == "heart":
        from common.data.heart import load_heart_sites

        return load_heart_sites(cfg.heart_protocol, cfg.sites, cfg.split_seed,
                                val_fraction=cfg.validation_fraction)
    if cfg.source == "medmnist":
        from common.data.medmnist import load_medmnist_sites

        spec, sites = load_medmnist_sites(cfg.medmnist)
    elif cfg.source == "csv":
        from common.data.csv_source import load_csv_sites

        spec, sites = load_csv_sites(cfg)
    else:
        from common.data.synthetic import load_synthetic_sites

        spec, sites = load_synthetic_sites(cfg)
    return spec, _select(sites, cfg.sites, cfg.source)


def declared_spec(cfg: DataConfig) -> DataSpec | None:
    """The task `cfg` names without reading a row: a MedMNIST dataset's image shape, classes
    and label names. None for tabular sources: hospitals read their rows with the bundle's
    schema, which already names the label and its classes."""
    if cfg.source == "medmnist":
        from common.data.medmnist import medmnist_spec

        return medmnist_spec(cfg.medmnist)
    return None


def _pool(sites: list[SiteSplit], which: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [s.split(which) for s in sites]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _simulate(sites: list[SiteSplit], cfg: DataConfig, seed: int) -> list[SiteSplit]:
    """Pool the natural sites' splits and re-split them over `cfg.num_sites` hospitals.

    The train split is partitioned as configured; each hospital's validation and test rows
    come from the pooled validation and test splits with that hospital's label mix.
    """
    kind, alpha = parse_partition(cfg.partition)
    k = cfg.num_sites or len(sites)
    x, y = _pool(sites, "train")
    if kind == "iid":
        parts = partition_iid(len(y), k, seed)
    elif kind == "dirichlet":
        assert alpha is not None
        parts = partition_dirichlet(y, k, alpha, seed)
    else:
        assert alpha is not None
        parts = partition_quantity(len(y), k, alpha, seed)
    shares = shares_of(parts, y)
    held = {}
    for i, which in enumerate(("validation", "test"), start=1):
        xs, ys = _pool(sites, which)
        if len(ys) < k:
            raise DataError(
                f"config key 'data.num_sites': the pooled {which} split has {len(ys)} rows, "
                f"too few to give each of the {k} simulated hospitals one"
            )
        held[which] = (xs, ys, partition_like(ys, shares, k, sub_seed(seed, 100 + i)))
    width = max(2, len(str(k - 1)))
    out = []
    for i, idx in enumerate(parts):
        xv, yv, pv = held["validation"]
        xt, yt, pt = held["test"]
        out.append(SiteSplit(f"site-{i:0{width}d}", x[idx], y[idx], xv[pv[i]], yv[pv[i]],
                             xt[pt[i]], yt[pt[i]]))
    return out


def _files_key(cfg: DataConfig) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of every user file the config reads: a changed file is re-read."""
    out = []
    for name in (*cfg.csv_paths, *cfg.test_paths, *((cfg.csv_schema,) if cfg.csv_schema else ())):
        try:
            st = Path(name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, -1, -1))  # the loader reports the missing file
    return tuple(out)


def raw_sites(cfg: DataConfig, seed: int) -> tuple[DataSpec, tuple[SiteSplit, ...]]:
    """The run's hospitals before preprocessing.

    Cached per process, keyed by the config, the seed and the files it reads: a simulation
    worker serves many virtual hospitals from one partition.
    """
    return _raw_sites(cfg, seed, _files_key(cfg))


@functools.lru_cache(maxsize=4)
def _raw_sites(cfg: DataConfig, seed: int, files: tuple[tuple[str, int, int], ...]
               ) -> tuple[DataSpec, tuple[SiteSplit, ...]]:
    spec, natural = natural_sites(cfg)
    kind, _ = parse_partition(cfg.partition)
    sites = natural if kind == "natural" else _simulate(natural, cfg, seed)
    for s in sites:
        if len(s.y_val) == 0 or len(s.y_test) == 0 or len(s.y_train) == 0:
            empty = next(k for k, v in s.sizes().items() if v == 0)
            raise DataError(f"site '{s.name}' has an empty {empty} split "
                            f"({s.sizes()}); the site is too small")
    return spec, tuple(sites)


def preprocess(site: SiteSplit, spec: DataSpec, mode: str, bundle_stats: SiteStats | None
               ) -> SiteSplit:
    """Fit the site's statistics on its train split (or take the bundle's) and apply them."""
    if mode == "bundle":
        if bundle_stats is None:
            raise DataError("config key 'data.normalisation' is 'bundle' but no bundle "
                            "normalisation statistics were given")
        stats = bundle_stats
    else:
        stats = SiteStats.fit(site.x_train, spec.schema, bundle_stats,
                              where=f"site '{site.name}' training split")
    return SiteSplit(site.name, stats.apply(site.x_train), site.y_train,
                     stats.apply(site.x_val), site.y_val, stats.apply(site.x_test), site.y_test,
                     stats=stats)


def load_federated(
    cfg: DataConfig, bundle_stats: SiteStats | None = None, seed: int = 0
) -> FederatedData:
    """Load `cfg.source`, partition it if asked, and preprocess every site.

    With a non-natural partition the natural sites' train splits are pooled and re-split over
    `cfg.num_sites` simulated hospitals ("site-00", ...); their validation and test rows come
    from the pooled validation and test splits with the same label mix.
    """
    spec, sites = raw_sites(cfg, seed)
    return FederatedData(spec, [preprocess(s, spec, cfg.normalisation, bundle_stats)
                                for s in sites])


SOURCE_SPLITS = {"train": "train", "validation": "validation", "val": "validation",
                 "test": "test"}


def load_source_split(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, DataSpec]:
    """Raw pooled x, y of one split over the (selected) natural sites, for pretraining.

    `train` excludes the validation rows, so a pretraining cohort's validation split stays
    unseen (the server's `source-validation` check uses it).
    """
    if split not in SOURCE_SPLITS:
        raise DataError(
            f"config key 'pretrain.split' must be train, validation or test, got {split!r}"
        )
    spec, sites = natural_sites(cfg)
    x, y = _pool(sites, SOURCE_SPLITS[split])
    return x, y, spec
