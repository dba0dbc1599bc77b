"""Clinical metrics from labels and predicted probabilities, in vectorised numpy.

Conventions, the same on server and client:

- Binary: a row is predicted positive when p(positive) > ``threshold`` (default 0.5, i.e. the
  arg-max with a tie going to the negative class). Multiclass: the arg-max.
- A metric that a split cannot define is ``None``, never 0 or 0.5: AUC with one class
  present; sensitivity without positives; specificity without negatives; PPV without
  predicted positives; NPV without predicted negatives.
- Balanced accuracy is the mean recall over the classes present in the labels.
- AUC is the Mann-Whitney statistic with average ranks for ties (equal to scikit-learn's
  ``roc_auc_score``; checked in tests/test_metrics.py).
- ECE uses 10 equal-width bins, bin i holding [i/10, (i+1)/10) and the last one also 1.0.

:func:`bootstrap_intervals` gives seeded 95% percentile intervals for small sites.
"""

from __future__ import annotations

import math

import numpy as np

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "ppv",
    "npv",
    "recall",
    "sensitivity",
    "specificity",
    "f1",
    "auc",
    "brier",
    "ece",
    "n",
    "positives",
)
MULTICLASS_METRIC_NAMES: tuple[str, ...] = (
    "accuracy", "balanced_accuracy", "f1", "auc", "brier", "ece", "n",
)
COUNT_KEYS = ("n", "positives")
ECE_BINS = 10
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_BLOCK_CELLS = 2**21  # row indices per block of resamples (16 MB as int64)


class MetricError(ValueError):
    """Labels or probabilities handed to :func:`compute_metrics` are malformed."""


def _check(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise MetricError(f"probabilities must have shape (N, C) with C >= 2, found {p.shape}")
    if y.ndim != 1 or len(y) != len(p):
        raise MetricError(f"labels must have shape ({len(p)},), found {y.shape}")
    if len(y) == 0:
        raise MetricError("metrics need at least one example, found 0")
    if not np.all(np.isfinite(p)) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise MetricError("probabilities must be finite and each row must sum to 1")
    if not np.issubdtype(y.dtype, np.number) or np.any((y < 0) | (y >= p.shape[1])):
        raise MetricError(f"labels must be class indices in 0..{p.shape[1] - 1}")
    if np.any(np.mod(y, 1) != 0):
        raise MetricError("labels must be integer class indices")
    return y.astype(np.int64), p


def expected_calibration_error(hit: np.ndarray, confidence: np.ndarray) -> float:
    """Sum over bins of (bin share) * |mean(hit) - mean(confidence)|.

    ``hit`` is the outcome the confidence predicts: y == 1 for p(positive), or "the top
    label is right" for the top-label confidence.
    """
    bins = np.minimum((confidence * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    gap = np.bincount(bins, weights=hit, minlength=ECE_BINS) - np.bincount(
        bins, weights=confidence, minlength=ECE_BINS)
    return float(np.sum(np.abs(gap)) / len(hit))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` along the last axis, ties sharing their average rank.

    The same as scipy's `rankdata(values, axis=-1)` (tested); numpy only, so a ClientApp
    process that scores a round does not import scipy.
    """
    x = np.asarray(values, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x[None, :]
    order = np.argsort(flat, axis=1, kind="mergesort")
    ordered = np.take_along_axis(flat, order, axis=1)
    n = flat.shape[1]
    positions = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64), ordered.shape)
    # in sorted order a tie group is a run; each member gets (first + last position) / 2
    starts = np.ones_like(ordered, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, positions, 0.0), axis=1)
    last = np.minimum.accumulate(np.where(ends, positions, np.inf)[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty_like(first)
    np.put_along_axis(ranks, order, (first + last) / 2.0, axis=1)
    return ranks.reshape(x.shape)


def binary_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of `score` for labels `y` (0/1); None when one class is absent."""
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(score)  # a tie counts one half
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def _binary(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    pos = p[:, 1]
    pred = pos > threshold
    truth = y == 1
    tp = float(np.sum(pred & truth))
    fp = float(np.sum(pred & ~truth))
    fn = float(np.sum(~pred & truth))
    tn = float(np.sum(~pred & ~truth))
    sens = _ratio(tp, tp + fn)
    spec = _ratio(tn, tn + fp)
    ppv = _ratio(tp, tp + fp)
    recalls = [r for r in (sens, spec) if r is not None]
    return {
        "accuracy": (tp + tn) / len(y),
        "balanced_accuracy": float(np.mean(recalls)),
        "precision": ppv,
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "recall": sens,
        "sensitivity": sens,
        "specificity": spec,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": binary_auc(y, pos),
        "brier": float(np.mean((pos - truth) ** 2)),
        "ece": expected_calibration_error(truth.astype(np.float64), pos),
        "n": len(y),
        "positives": int(truth.sum()),
    }


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """One-vs-rest AUC averaged over the classes present; None with fewer than two."""
    present = np.unique(y)
    if len(present) < 2:
        return None
    scores = [binary_auc((y == c).astype(np.int64), p[:, c]) for c in present]
    return float(np.mean([s for s in scores if s is not None]))


def _multiclass(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    k = p.shape[1]
    pred = p.argmax(axis=1)
    f1s, recalls = [], []
    for c in range(k):
        tp = float(np.sum((pred == c) & (y == c)))
        fp = float(np.sum((pred == c) & (y != c)))
        fn = float(np.sum((pred != c) & (y == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else 0.0)
        if tp + fn > 0:
            recalls.append(tp / (tp + fn))
    onehot = np.eye(k)[y]
    return {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(np.mean(recalls)),
        "f1": float(np.mean(f1s)),
        "auc": _macro_auc(y, p),
        # sum over classes of squared errors, mean over rows: range [0, 2]
        "brier": float(np.mean(np.sum((p - onehot) ** 2, axis=1))),
        "ece": expected_calibration_error((pred == y).astype(np.float64), p.max(axis=1)),
        "n": len(y),
    }


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, threshold: float = 0.5
                    ) -> dict[str, float | None]:
    """Clinical metrics of one split.

    Parameters
    ----------
    y_true : np.ndarray
        Class indices, shape (N,).
    proba : np.ndarray
        Predicted probabilities, shape (N, C), rows summing to 1.
    threshold : float
        Binary only: predict positive when p(positive) > threshold.

    Returns
    -------
    dict[str, float | None]
        Binary (C == 2): the keys of :data:`METRIC_NAMES`; ``ece`` on p(positive); ``n`` and
        ``positives`` are counts. Multiclass: the keys of :data:`MULTICLASS_METRIC_NAMES`,
        with macro F1, one-vs-rest AUC averaged over the classes present, multiclass Brier
        (range [0, 2]) and top-label ECE. Undefined metrics are ``None`` (module notes).

    Raises
    ------
    MetricError
        On empty input, mismatched shapes, labels out of range or rows not summing to 1.
    """
    y, p = _check(y_true, proba)
    return _binary(y, p, threshold) if p.shape[1] == 2 else _multiclass(y, p)


def _binary_draws(y: np.ndarray, pos: np.ndarray, threshold: float, idx: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Every binary metric for each resample (rows of `idx`) at once; NaN where undefined."""
    truth = (y == 1)[idx]
    score = pos[idx]
    pred = score > threshold
    tp = (pred & truth).sum(axis=1).astype(np.float64)
    fp = (pred & ~truth).sum(axis=1).astype(np.float64)
    fn = (~pred & truth).sum(axis=1).astype(np.float64)
    tn = (~pred & ~truth).sum(axis=1).astype(np.float64)
    n = idx.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        ppv = tp / (tp + fp)
        npv = tn / (tn + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
        n_pos = truth.sum(axis=1).astype(np.float64)
        ranks = average_ranks(score)
        auc = ((ranks * truth).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))
    balanced = np.nanmean(np.stack([sens, spec]), axis=0)
    conf = score
    bins = np.minimum((conf * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    gaps = np.zeros(len(idx))
    for b in range(ECE_BINS):
        inside = bins == b
        gaps += np.abs(((truth - conf) * inside).sum(axis=1))
    return {"accuracy": (tp + tn) / n, "balanced_accuracy": balanced, "precision": ppv,
            "ppv": ppv, "npv": npv, "recall": sens, "sensitivity": sens, "specificity": spec,
            "f1": f1, "auc": auc, "brier": ((score - truth) ** 2).mean(axis=1),
            "ece": gaps / n}


def bootstrap_intervals(
    y_true: np.ndarray, proba: np.ndarray, threshold: float = 0.5, *,
    samples: int = BOOTSTRAP_SAMPLES, seed: int = 0, level: float = 0.95,
) -> dict[str, tuple[float, float] | None]:
    """Percentile intervals of every metric over `samples` resamples of the rows (seeded).

    A metric undefined in more than half of the resamples (e.g. specificity of a split
    without negatives) gets ``None``; counts get no interval. Binary metrics are computed for
    all resamples at once (equal to :func:`compute_metrics` per resample; tested).
    """
    y, p = _check(y_true, proba)
    rng = np.random.default_rng(seed)
    # resamples drawn a block at a time (the same stream as one draw): memory stays near
    # BOOTSTRAP_BLOCK_CELLS indices whatever the file's rows and the resamples asked for
    block = max(1, BOOTSTRAP_BLOCK_CELLS // len(y))
    blocks = (rng.integers(0, len(y), size=(min(block, samples - start), len(y)))
              for start in range(0, samples, block))  # lazily: one block in memory at a time
    if p.shape[1] == 2:
        parts = [_binary_draws(y, p[:, 1], threshold, idx) for idx in blocks]
        draws = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
        names = METRIC_NAMES
    else:
        names = MULTICLASS_METRIC_NAMES
        per = [compute_metrics(y[i], p[i], threshold) for idx in blocks for i in idx]
        draws = {k: np.array([np.nan if m[k] is None else float(m[k]) for m in per])  # type: ignore[arg-type]
                 for k in names if k not in COUNT_KEYS}
    tail = (1.0 - level) / 2.0
    out: dict[str, tuple[float, float] | None] = {}
    for key in names:
        if key in COUNT_KEYS:
            continue
        values = draws[key][~np.isnan(draws[key])]
        if len(values) * 2 < samples:
            out[key] = None
            continue
        lo, hi = np.quantile(values, [tail, 1.0 - tail])
        out[key] = (float(lo), float(hi))
    return out


def mean_defined(values: list[float | None]) -> float | None:
    """Mean of the defined values (a metric undefined at a site does not count as 0)."""
    defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(defined) / len(defined) if defined else None
