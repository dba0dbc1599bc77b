"""The data contract every source follows: each site's rows in three splits, carved once.

- **train** fits weights, imputation and normalisation statistics;
- **validation** (carved from train, stratified and seeded, unless the user gives it) chooses
  hyper-parameters, early stopping, the registry's `best`, personalisation, calibration and
  the decision threshold;
- **test** (given by the user or carved once) is only reported.

Sources build :class:`SiteSplit` objects with :func:`three_way` or :func:`with_validation`;
everything downstream receives the splits already separated, so no caller can reach test rows
by accident.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from common.data.schema import DataError, Schema

if TYPE_CHECKING:
    from common.data.preprocess import SiteStats

SPLITS = ("train", "validation", "test")
TEST_LABEL = "test — not used for any choice"  # how test figures are labelled wherever shown


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
    """One hospital's train, validation and test split (x float32, y int64).

    `stats` is what turned the raw rows into these x (None while the rows are still raw).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    stats: SiteStats | None = field(default=None, compare=False)

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of `train`, `validation` or `test`."""
        if which == "train":
            return self.x_train, self.y_train
        if which == "validation":
            return self.x_val, self.y_val
        if which == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split must be one of {SPLITS}, got {which!r}")

    def sizes(self) -> dict[str, int]:
        """Rows per split."""
        return {"train": len(self.y_train), "validation": len(self.y_val),
                "test": len(self.y_test)}


def sub_seed(seed: int, i: int) -> int:
    """An independent seed derived from (`seed`, `i`)."""
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def carve(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int, keep: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out about `fraction` of the rows: (x kept, y kept, x held out, y held out).

    Stratified (each class split separately) when every class has at least 2 rows; rows keep
    their order inside each part. With 2+ rows both parts are non-empty, and at least `keep`
    rows are kept when there are more than `keep` (so a validation split can still be
    carved from them).
    """
    n = len(y)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    out: list[np.ndarray] = []
    if n >= 2 and len(classes) > 1 and counts.min() >= 2:
        for c, n_c in zip(classes, counts, strict=True):
            idx = rng.permutation(np.flatnonzero(y == c))
            k = min(max(round(n_c * fraction), 1), n_c - 1)
            out.append(idx[:k])
    elif n >= 2:
        k = min(max(math.ceil(n * fraction), 1), n - min(keep, n - 1))
        out.append(rng.permutation(n)[:k])
    mask = np.zeros(n, dtype=bool)
    if out:
        mask[np.concatenate(out)] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def with_validation(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray, val_fraction: float, seed: int) -> SiteSplit:
    """A site whose test split is fixed: validation is carved from its train split."""
    if len(y_train) < 2:
        raise DataError(
            f"site '{name}' has {len(y_train)} training row(s): too few to carve a validation "
            f"split (data.validation_fraction {val_fraction:g}); give the site more rows"
        )
    x_tr, y_tr, x_val, y_val = carve(x_train, y_train, val_fraction, sub_seed(seed, 1))
    return SiteSplit(name, x_tr, y_tr, x_val, y_val, x_test, y_test)


def three_way(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float,
              val_fraction: float, seed: int) -> SiteSplit:
    """Carve test (seeded with `seed`), then validation from what is left."""
    if len(y) < 3:
        raise DataError(
            f"site '{name}' has {len(y)} row(s): too few for a train, a validation and a test "
            "split (at least 3 rows are needed)"
        )
    x_tr, y_tr, x_te, y_te = carve(x, y, test_fraction, seed, keep=2)
    return with_validation(name, x_tr, y_tr, x_te, y_te, val_fraction, seed)


def check_fraction(key: str, value: float) -> None:
    """A split fraction must lie strictly between 0 and 1."""
    if not (0.0 < value < 1.0):
        raise DataError(f"config key '{key}' must lie strictly between 0 and 1, got {value}")
