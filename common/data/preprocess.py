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
from common.data.schema import INDICATOR_SUFFIX, DataError, Schema

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
        elif name.endswith(INDICATOR_SUFFIX) and name != col.name:
            fill[j] = 0.0  # indicators are never missing; a fill keeps the check simple
    for j, (name, col, code) in enumerate(encoded):
        policy = schema.policy(col)
        if policy == "refuse" or code is not None or name != col.name:
            continue
        fill[j] = _column_fill(x[:, j], policy, col.fill_value, fallback, j, col.name, where)
    for name, idx in blocks.items():
        col = schema.column(name)
        policy = schema.policy(col)
        if policy == "refuse":
            continue
        codes = _block_codes(x[:, idx], col.categories)
        value = _column_fill(codes, policy, col.fill_value, None, -1, name, where,
                             fallback_block=(fallback, idx, col.categories))
        fill[idx] = [1.0 if value == c else 0.0 for c in col.categories[1:]]
    return fill


def _block_codes(block: np.ndarray, categories: tuple[float, ...]) -> np.ndarray:
    """The category code of each row of a one-hot block (NaN where missing)."""
    codes = np.full(len(block), categories[0])
    for k, code in enumerate(categories[1:]):
        codes[block[:, k] == 1.0] = code
    codes[np.isnan(block).any(axis=1)] = np.nan
    return codes


def _column_fill(values: np.ndarray, policy: str, constant: float | None,
                 fallback: SiteStats | None, j: int, name: str, where: str,
                 fallback_block: tuple[SiteStats | None, list[int], tuple[float, ...]] | None
                 = None) -> float:
    if policy == "constant":
        assert constant is not None  # the schema parser requires it
        return constant
    observed = values[~np.isnan(values)]
    if len(observed) == 0:
        found = _fallback(fallback, j, fallback_block)
        if found is None:
            raise DataError(
                f"{where}: column '{name}' has no observed value to impute from "
                f"(policy {policy}) and no bundle statistic to fall back on"
            )
        return found
    if policy == "median":
        return float(np.median(observed))
    if policy == "mean":
        return float(np.mean(observed))
    return _most_frequent(observed)


def _fallback(fallback: SiteStats | None, j: int,
              block: tuple[SiteStats | None, list[int], tuple[float, ...]] | None
              ) -> float | None:
    if block is not None:
        stats, idx, categories = block
        if stats is None or stats.fill is None or np.isnan(stats.fill[idx]).any():
            return None
        hot = [c for c, v in zip(categories[1:], stats.fill[idx], strict=True) if v == 1.0]
        return float(hot[0]) if hot else float(categories[0])
    if fallback is None or fallback.fill is None or np.isnan(fallback.fill[j]):
        return None
    return float(fallback.fill[j])
