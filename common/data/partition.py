"""Split n rows over k simulated hospitals: iid, label skew (Dirichlet) or size skew.

Pure functions of their arguments and seed; each returns k sorted index arrays that together
cover every index exactly once.
"""

from __future__ import annotations

import math

import numpy as np

from common.data.schema import DataError

KINDS = ("natural", "iid", "dirichlet", "quantity")
_RETRIES = 100  # Dirichlet draws tried before small sites are topped up by hand


def parse_partition(text: str) -> tuple[str, float | None]:
    """``"natural"``, ``"iid"``, ``"dirichlet:0.3"`` or ``"quantity:0.5"`` -> (kind, alpha)."""
    kind, _, arg = str(text).partition(":")
    if kind in ("natural", "iid") and not arg:
        return kind, None
    if kind in ("dirichlet", "quantity") and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return kind, alpha
    raise DataError(
        f"config key 'data.partition' must be natural, iid, dirichlet:ALPHA or quantity:ALPHA "
        f"with ALPHA > 0, got {text!r}"
    )


def _check(n: int, k: int, min_size: int) -> None:
    if k < 1:
        raise DataError(f"partitioning needs at least one site, got {k}")
    if n < k * min_size:
        raise DataError(f"cannot give {k} sites at least {min_size} rows each from only {n} rows")


def partition_iid(n: int, k: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into k near-equal parts."""
    _check(n, k, 1)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(perm, k)]


def _top_up(parts: list[list[int]], min_size: int) -> None:
    """Move rows from the largest sites to any site below `min_size` (in place)."""
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            parts[i].append(parts[donor].pop())


def partition_dirichlet(
    y: np.ndarray, k: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label skew: each class is spread over the sites by proportions drawn from Dir(alpha).

    Small alpha gives sites dominated by one class; large alpha approaches iid. Draws are
    repeated until every site has `min_size` rows, then topped up from the largest site.
    """
    y = np.asarray(y)
    n = len(y)
    _check(n, k, min_size)
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    parts: list[list[int]] = []
    for _ in range(_RETRIES):
        parts = [[] for _ in range(k)]
        for idx in classes:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    _top_up(parts, min_size)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_quantity(
    n: int, k: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Size skew: site shares drawn from Dir(alpha) on top of `min_size` rows each."""
    _check(n, k, min_size)
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.full(k, alpha))
    extra = n - k * min_size
    sizes = np.full(k, min_size) + np.floor(share * extra).astype(int)
    # hand the rounding remainder to the sites with the largest fractional parts
    rest = n - int(sizes.sum())
    order = np.argsort(-(share * extra - np.floor(share * extra)), kind="stable")
    sizes[order[:rest]] += 1
    perm = rng.permutation(n)
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def shares_of(parts: list[np.ndarray], y: np.ndarray) -> dict[int, np.ndarray]:
    """Per class, the fraction of its rows each site holds in a partition of `y`."""
    y = np.asarray(y)
    out = {}
    for c in np.unique(y):
        counts = np.array([int(np.sum(y[p] == c)) for p in parts], dtype=np.float64)
        out[int(c)] = counts / counts.sum()
    return out


def partition_like(y: np.ndarray, shares: dict[int, np.ndarray], k: int, seed: int,
                   min_size: int = 1) -> list[np.ndarray]:
    """Split another split's rows over k sites with the same per-class shares.

    This keeps each simulated hospital's validation and test splits drawn from its own label
    mix. Classes absent from `shares` are spread evenly; every site gets `min_size` rows
    (topped up from the largest site) when there are enough rows.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        share = shares.get(int(c), np.full(k, 1.0 / k))
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].extend(chunk.tolist())
    if len(y) >= k * min_size:
        _top_up(parts, min_size)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
