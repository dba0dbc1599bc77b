"""From a :class:`DataConfig` to hospitals: natural sites or simulated ones, normalised.

Every source module returns its natural sites raw (tables un-normalised, images float32 in
[0, 1], NCHW). This module optionally re-partitions the pooled train splits over simulated
hospitals and then normalises each site, so partitioning and normalisation work the same for
every source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.config import DataConfig
from common.data.normalise import Normaliser
from common.data.partition import (
    parse_partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
)
from common.data.schema import DataError, Schema

SOURCES = ("heart", "medmnist", "csv", "synthetic")
NORMALISATIONS = ("site", "bundle")


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its input and output."""

    kind: str  # tabular | image
    input_shape: tuple[int, ...]  # (F,) or (C, 28, 28)
    num_classes: int
    labels: tuple[str, ...]
    feature_names: tuple[str, ...] = ()  # tabular: encoded feature names
    schema: Schema | None = None  # tabular sources


@dataclass
class SiteSplit:
    """One hospital's local train and test split (x float32, y int64)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass
class FederatedData:
    """The hospitals of one run plus the server's held-out set."""

    spec: DataSpec
    sites: list[SiteSplit]
    heldout_x: np.ndarray
    heldout_y: np.ndarray


def _check_config(cfg: DataConfig) -> None:
    if cfg.source not in SOURCES:
        raise DataError(f"config key 'data.source' must be one of {SOURCES}, got {cfg.source!r}")
    if cfg.normalisation not in NORMALISATIONS:
        raise DataError(
            f"config key 'data.normalisation' must be one of {NORMALISATIONS}, "
            f"got {cfg.normalisation!r}"
        )
    if not (0.0 < cfg.test_fraction < 1.0):
        raise DataError(
            f"config key 'data.test_fraction' must lie strictly between 0 and 1, "
            f"got {cfg.test_fraction}"
        )
    if cfg.num_sites < 0:
        raise DataError(f"config key 'data.num_sites' must be 0 or more, got {cfg.num_sites}")


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
    """The source's own hospitals (restricted to `cfg.sites`), raw."""
    _check_config(cfg)
    # imported here: the source modules import DataSpec/SiteSplit from this module
    if cfg.source == "heart":
        from common.data.heart import load_heart_sites

        return load_heart_sites(cfg.heart_protocol, cfg.sites, cfg.split_seed)
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


def split_site(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out about `test_fraction` of one site's rows as its local test split.

    Stratified (each class split separately) when every class has at least 2 rows; rows keep
    their order inside each split. A site with 2+ rows always gets non-empty train and test.
    """
    n = len(y)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    test: list[np.ndarray] = []
    if n >= 2 and len(classes) > 1 and counts.min() >= 2:
        for c, n_c in zip(classes, counts, strict=True):
            idx = rng.permutation(np.flatnonzero(y == c))
            k = min(max(round(n_c * test_fraction), 1), n_c - 1)
            test.append(idx[:k])
    elif n >= 2:
        k = min(max(math.ceil(n * test_fraction), 1), n - 1)
        test.append(rng.permutation(n)[:k])
    mask = np.zeros(n, dtype=bool)
    if test:
        mask[np.concatenate(test)] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def _sub_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def _simulate(sites: list[SiteSplit], cfg: DataConfig, seed: int) -> list[SiteSplit]:
    kind, alpha = parse_partition(cfg.partition)
    k = cfg.num_sites or len(sites)
    x = np.concatenate([s.x_train for s in sites])
    y = np.concatenate([s.y_train for s in sites])
    if kind == "iid":
        parts = partition_iid(len(y), k, seed)
    elif kind == "dirichlet":
        assert alpha is not None
        parts = partition_dirichlet(y, k, alpha, seed)
    else:
        assert alpha is not None
        parts = partition_quantity(len(y), k, alpha, seed)
    width = max(2, len(str(k - 1)))
    out = []
    for i, idx in enumerate(parts):
        x_tr, y_tr, x_te, y_te = split_site(x[idx], y[idx], cfg.test_fraction, _sub_seed(seed, i))
        out.append(SiteSplit(f"site-{i:0{width}d}", x_tr, y_tr, x_te, y_te))
    return out


def _normalise(site: SiteSplit, norm: Normaliser) -> SiteSplit:
    return SiteSplit(
        site.name, norm.apply(site.x_train), site.y_train, norm.apply(site.x_test), site.y_test
    )


def load_federated(
    cfg: DataConfig, bundle_normaliser: Normaliser | None = None, seed: int = 0
) -> FederatedData:
    """Load `cfg.source`, partition it if asked, and normalise every site.

    Held-out set: the natural sites' test splits, each normalised like its natural site (its
    own train statistics, or the bundle's). With a non-natural partition only the natural train
    splits are pooled and re-split over `cfg.num_sites` simulated hospitals ("site-00", ...),
    each keeping `cfg.test_fraction` of its share as local test; normalisation follows the
    partitioning.
    """
    spec, natural = natural_sites(cfg)
    kind, _ = parse_partition(cfg.partition)
    if cfg.normalisation == "bundle" and bundle_normaliser is None:
        raise DataError(
            "config key 'data.normalisation' is 'bundle' but no bundle normalisation "
            "statistics were given"
        )

    def norm_for(site: SiteSplit) -> Normaliser:
        if bundle_normaliser is not None and cfg.normalisation == "bundle":
            return bundle_normaliser
        return Normaliser.fit(site.x_train)

    heldout = [norm_for(s).apply(s.x_test) for s in natural]
    heldout_y = np.concatenate([s.y_test for s in natural])
    sites = natural if kind == "natural" else _simulate(natural, cfg, seed)
    sites = [_normalise(s, norm_for(s)) for s in sites]
    return FederatedData(spec, sites, np.concatenate(heldout), heldout_y)


def load_source_split(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray, DataSpec]:
    """Raw pooled x, y of one split over the (selected) natural sites, for pretraining."""
    if split == "val":
        if cfg.source != "medmnist":
            raise DataError(
                f"config key 'pretrain.split' is 'val' but source {cfg.source!r} has no "
                f"validation split (use train or test)"
            )
        _check_config(cfg)
        from common.data.medmnist import load_medmnist_split

        x, y, spec = load_medmnist_split(cfg.medmnist, "val")
        return x, y, spec
    if split not in ("train", "test"):
        raise DataError(f"config key 'pretrain.split' must be train, test or val, got {split!r}")
    spec, sites = natural_sites(cfg)
    if split == "train":
        return (
            np.concatenate([s.x_train for s in sites]),
            np.concatenate([s.y_train for s in sites]),
            spec,
        )
    return (
        np.concatenate([s.x_test for s in sites]),
        np.concatenate([s.y_test for s in sites]),
        spec,
    )
