"""What a site fits on its own training split and applies to every row it scores.

:class:`SiteStats` is the whole preprocessing that sits between an encoded table (or an image
array) and the model: the fill value of every column whose missing cells the schema imputes,
then z-normalisation. It is fitted on the training split only, stored next to the site's model
(``site_stats.json``), and applied identically in training, evaluation and ``medfed predict``.
Images have no missing values, so their stats are the normaliser alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data.normalise import Normaliser
from common.data.schema import DataError, Schema

STATS_FORMAT = 1


@dataclass(frozen=True)
class SiteStats:
    """Fill values per encoded feature (NaN: never missing) and the normaliser after filling."""

    normaliser: Normaliser
    fill: np.ndarray | None = None  # float64 (F,); None: nothing is ever imputed

    @classmethod
    def fit(
        cls,
        x_train: np.ndarray,
        schema: Schema | None,
        fallback: SiteStats | None = None,
        where: str = "training split",
    ) -> SiteStats:
        """Fit on a (raw, encoded) training split.

        A column whose every training value is missing takes its fill value from `fallback`
        (the bundle's statistics), else it is an error naming the column.
        """
        x = np.asarray(x_train, dtype=np.float64)
        fill = _fit_fill(x, schema, fallback, where) if schema is not None else None
        filled = _filled(x, fill)
        if np.isnan(filled).any():
            col = int(np.flatnonzero(np.isnan(filled).any(axis=0))[0])
            raise DataError(f"{where}: encoded feature {col} has missing values the schema does "
                            "not impute")
        return cls(Normaliser.fit(filled), fill)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Fill, then normalise: float32 model inputs."""
        return self.normaliser.apply(_filled(np.asarray(x, dtype=np.float64), self.fill))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"format", "mean", "std", "fill"}``; unfilled features are null."""
        out: dict[str, Any] = {"format": STATS_FORMAT, **self.normaliser.to_dict()}
        if self.fill is not None:
            out["fill"] = [None if np.isnan(v) else float(v) for v in self.fill]
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "site statistics") -> SiteStats:
        """Inverse of :meth:`to_dict`; also reads the older ``{"mean", "std"}`` form."""
        if not isinstance(d, dict):
            raise DataError(f"{where} must be a JSON object with keys mean and std")
        d = dict(d)
        d.pop("format", None)
        raw_fill = d.pop("fill", None)
        try:
            normaliser = Normaliser.from_dict(d)
        except DataError as err:
            raise DataError(f"{where}: {err}") from err
        fill = None
        if raw_fill is not None:
            if not isinstance(raw_fill, list) or len(raw_fill) != normaliser.mean.size or not all(
                v is None or (isinstance(v, int | float) and not isinstance(v, bool)
                              and np.isfinite(v)) for v in raw_fill):
                raise DataError(f"{where}: key 'fill' must list one number or null per feature")
            fill = np.array([np.nan if v is None else float(v) for v in raw_fill])
        return cls(normaliser, fill)

    def to_json(self) -> str:
        """Canonical JSON text (its sha256 is what a signed site manifest records)."""
        return json.dumps(self.to_dict(), sort_keys=True) + "\n"


def read_site_stats(path: Path) -> SiteStats:
    """A ``site_stats.json`` file; any problem is one sentence naming it."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"site statistics file {path} does not exist") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"site statistics file {path} is not a readable JSON file") from err
    return SiteStats.from_dict(raw, where=f"site statistics file {path}")


def _filled(x: np.ndarray, fill: np.ndarray | None) -> np.ndarray:
    if fill is None or not np.isnan(x).any():
        return x
    if fill.size != x.shape[1]:
        raise DataError(f"site statistics cover {fill.size} features but the data has "
                        f"{x.shape[1]}")
    out = x.copy()
    rows, cols = np.nonzero(np.isnan(out))
    out[rows, cols] = fill[cols]
    return out


def _most_frequent(values: np.ndarray) -> float:
    """Mode; ties go to the smallest value."""
    uniq, counts = np.unique(values, return_counts=True)
    return float(uniq[np.argmax(counts)])


def _fit_fill(x: np.ndarray, schema: Schema, fallback: SiteStats | None, where: str
              ) -> np.ndarray:
    """One fill value per encoded feature; NaN where the column's policy is ``refuse``."""
    encoded = schema.encoded_columns()
    if len(encoded) != x.shape[1]:
        raise DataError(f"{where}: the schema encodes {len(encoded)} features but the data has "
                        f"{x.shape[1]}")
    fill = np.full(x.shape[1], np.nan)
    blocks: dict[str, list[int]] = {}
    for j, (name, col, code) in enumerate(encoded):
        if code is not None:
            blocks.setdefault(col.name, []).append(j)
        elif name != col.name:  # a missing indicator: never missing itself
            fill[j] = 0.0
        elif schema.policy(col) != "refuse":
            known = _known(fallback, [j])
            fill[j] = _statistic(x[:, j], schema.policy(col), col.fill_value,
                                 None if known is None else float(known[0]), col.name, where)
    for name, idx in blocks.items():
        col = schema.column(name)
        if schema.policy(col) == "refuse":
            continue
        known = _known(fallback, idx)
        # the bundle's fill of a one-hot block, as the code it stands for
        back = None if known is None else _block_codes(known[None, :], col.categories)[0]
        code = _statistic(_block_codes(x[:, idx], col.categories), schema.policy(col),
                          col.fill_value, back, name, where)
        fill[idx] = [1.0 if code == c else 0.0 for c in col.categories[1:]]
    return fill


def _block_codes(block: np.ndarray, categories: tuple[float, ...]) -> np.ndarray:
    """The category code of each row of a one-hot block (NaN where missing)."""
    codes = np.full(len(block), categories[0])
    for k, code in enumerate(categories[1:]):
        codes[block[:, k] == 1.0] = code
    codes[np.isnan(block).any(axis=1)] = np.nan
    return codes


def _known(fallback: SiteStats | None, idx: list[int]) -> np.ndarray | None:
    """The bundle's fill values of these encoded features, when it has them all."""
    if fallback is None or fallback.fill is None or np.isnan(fallback.fill[idx]).any():
        return None
    return fallback.fill[idx]


def _statistic(values: np.ndarray, policy: str, constant: float | None,
               fallback: float | None, name: str, where: str) -> float:
    """The fill value of one column under `policy`, from its observed training values."""
    if policy == "constant":
        assert constant is not None  # the schema parser requires it
        return constant
    observed = values[~np.isnan(values)]
    if len(observed) == 0:
        if fallback is None or np.isnan(fallback):
            raise DataError(
                f"{where}: column '{name}' has no observed value to impute from "
                f"(policy {policy}) and no bundle statistic to fall back on"
            )
        return fallback
    if policy == "median":
        return float(np.median(observed))
    if policy == "mean":
        return float(np.mean(observed))
    return _most_frequent(observed)
