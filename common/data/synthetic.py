"""SYNTHETIC hospitals for scale tests and benchmarks (not patient data; named as such).

One fixed, seeded logistic model P(y=1 | x) = sigmoid(w . x) is shared by all sites, so a
single global model can learn it. Sites differ in size (geometric: the largest holds about
ten times the rows of the smallest) and in label prevalence: each site's features are shifted
along w, which moves its share of positives (covariate shift, same P(y | x)). Vectorised, so
thousands of sites take milliseconds.
"""

from __future__ import annotations

import numpy as np

from common.config import DataConfig
from common.data.schema import Column, DataError, Schema
from common.data.splits import DataSpec, SiteSplit, three_way

SEED = 20240613  # fixed: the synthetic world is the same in every run
MIN_ROWS = 4  # per site, so every site has at least 2 train, 1 validation and 1 test row
WEIGHT_NORM = 3.0  # |w|: larger is easier; 3 gives a clearly learnable but noisy task
MAX_SHIFT = 1.0  # site shift along w, in units of the feature standard deviation
PREFIX = "synthetic-site-"


def synthetic_schema(n_features: int) -> Schema:
    """Numeric columns f00, f01, ... and a 0/1 column "label"."""
    width = max(2, len(str(n_features - 1)))
    cols = tuple(Column(f"f{i:0{width}d}", "numeric", "synthetic") for i in range(n_features))
    return Schema(cols, "label", (1.0,), (0.0,), ("synthetic-negative", "synthetic-positive"))


def site_sizes(total: int, k: int) -> np.ndarray:
    """Geometric sizes, largest first, at least MIN_ROWS each, summing to max(total, MIN_ROWS*k)."""
    extra = max(total - MIN_ROWS * k, 0)
    weights = 10.0 ** (-np.arange(k) / max(k - 1, 1))
    sizes = MIN_ROWS + np.floor(extra * weights / weights.sum()).astype(np.int64)
    sizes[: extra - int(sizes.sum() - MIN_ROWS * k)] += 1  # rounding remainder to the largest
    return sizes


def _check(cfg: DataConfig) -> None:
    for key, value in (
        ("synthetic_sites", cfg.synthetic_sites),
        ("synthetic_features", cfg.synthetic_features),
        ("synthetic_samples", cfg.synthetic_samples),
    ):
        if value < 1:
            raise DataError(f"config key 'data.{key}' must be at least 1, got {value}")


def load_synthetic_sites(cfg: DataConfig) -> tuple[DataSpec, list[SiteSplit]]:
    """`cfg.synthetic_sites` labelled-synthetic hospitals, split with `cfg.split_seed`.

    When `synthetic_samples` is below ``4 * synthetic_sites`` each site still gets 4 rows.
    """
    _check(cfg)
    k, f = cfg.synthetic_sites, cfg.synthetic_features
    rng = np.random.default_rng([SEED, k, f, cfg.synthetic_samples])
    w = rng.normal(size=f)
    w *= WEIGHT_NORM / np.linalg.norm(w)
    sizes = site_sizes(cfg.synthetic_samples, k)
    shifts = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=k)
    owner = np.repeat(np.arange(k), sizes)
    x = rng.normal(size=(len(owner), f)) + shifts[owner, None] * (w / np.linalg.norm(w))
    y = (rng.random(len(owner)) < 1.0 / (1.0 + np.exp(-(x @ w)))).astype(np.int64)
    x = x.astype(np.float32)
    width = max(2, len(str(k - 1)))
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    sites = []
    for i in range(k):
        rows = slice(bounds[i], bounds[i + 1])
        sites.append(three_way(f"{PREFIX}{i:0{width}d}", x[rows], y[rows], cfg.test_fraction,
                               cfg.validation_fraction, cfg.split_seed))
    schema = synthetic_schema(f)
    names = tuple(schema.feature_names())
    return DataSpec("tabular", (f,), 2, schema.labels, names, schema), sites
