"""Z-normalisation statistics: per feature for tables, per channel for NCHW images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data.schema import DataError


@dataclass(frozen=True)
class Normaliser:
    """Mean and standard deviation per feature (N, F) or per channel (N, C, H, W)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Normaliser:
        """Statistics of `x` (float64 maths).

        The standard deviation is the sample one (ddof=1), as ``torch.std`` in FLamby's heart
        loader; a constant feature (or a single row) gets std 1 so it maps to 0, not NaN.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim not in (2, 4) or x.shape[0] == 0:
            raise DataError(
                f"normalisation needs a non-empty (N, F) or (N, C, H, W) array, got shape {x.shape}"
            )
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        mean = x.mean(axis=axes)
        count = x.size // mean.size
        std = x.std(axis=axes, ddof=1) if count > 1 else np.zeros_like(mean)
        std = np.where(std > 0, std, 1.0)
        return cls(mean=mean, std=std)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` as float32; the feature/channel axis must match."""
        x = np.asarray(x, dtype=np.float64)
        size = self.mean.size
        if x.ndim == 2 and x.shape[1] == size:
            out = (x - self.mean) / self.std
        elif x.ndim == 4 and x.shape[1] == size:
            out = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        else:
            raise DataError(
                f"normalisation statistics cover {size} features/channels but the data has "
                f"shape {x.shape}"
            )
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the bundle manifest."""
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: Any) -> Normaliser:
        """Inverse of :meth:`to_dict`; checks lengths and that every std is positive."""
        if not isinstance(d, dict) or set(d) != {"mean", "std"}:
            raise DataError("normalisation statistics must be a mapping with keys mean and std")
        try:
            mean = np.asarray(d["mean"], dtype=np.float64)
            std = np.asarray(d["std"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise DataError("normalisation keys 'mean' and 'std' must be lists of numbers") from err
        if mean.ndim != 1 or mean.shape != std.shape or mean.size == 0:
            raise DataError("normalisation keys 'mean' and 'std' must be lists of equal length")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise DataError("normalisation key 'std' must be positive and all values finite")
        return cls(mean=mean, std=std)
