"""Clinical metrics from labels and predicted probabilities (scikit-learn where it has them).

Conventions, the same on server and client:

- The predicted class is the arg-max of the probabilities (binary: positive when
  p(positive) > 0.5; a tie goes to the negative class).
- AUC is ``None`` when it is undefined: a split where only one class is present (e.g. a
  hospital whose test split is all positive). It is never reported as 0 or 0.5.
- Precision (no predicted positives) and specificity (no actual negatives) are 0.0 when
  undefined, like scikit-learn's ``zero_division=0``; recall likewise with no positives.
- ECE uses 10 equal-width bins, bin i holding [i/10, (i+1)/10) and the last one also 1.0.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "precision",
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
MULTICLASS_METRIC_NAMES: tuple[str, ...] = ("accuracy", "f1", "auc", "brier", "ece", "n")
ECE_BINS = 10


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
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.mean() * abs(hit[inside].mean() - confidence[inside].mean())
    return float(total)


def _binary(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    pred = p.argmax(axis=1)
    pos = p[:, 1]
    tn, fp, _, _ = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    recall = float(recall_score(y, pred, labels=[0, 1], zero_division=0))
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, labels=[0, 1], zero_division=0)),
        "recall": recall,
        "sensitivity": recall,
        "specificity": float(tn / (tn + fp)) if tn + fp > 0 else 0.0,
        "f1": float(f1_score(y, pred, labels=[0, 1], zero_division=0)),
        "auc": float(roc_auc_score(y, pos)) if len(np.unique(y)) == 2 else None,
        "brier": float(brier_score_loss(y, pos, pos_label=1)),
        "ece": expected_calibration_error((y == 1).astype(np.float64), pos),
        "n": len(y),
        "positives": int(np.sum(y == 1)),
    }


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """One-vs-rest AUC averaged over the classes present; None with fewer than two."""
    present = np.unique(y)
    if len(present) < 2:
        return None
    scores = [roc_auc_score(y == c, p[:, c]) for c in present]
    return float(np.mean(scores))


def _multiclass(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    labels = list(range(p.shape[1]))
    pred = p.argmax(axis=1)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "auc": _macro_auc(y, p),
        # sum over classes of squared errors, mean over rows: range [0, 2]
        "brier": float(brier_score_loss(y, p, labels=labels, scale_by_half=False)),
        "ece": expected_calibration_error((pred == y).astype(np.float64), p.max(axis=1)),
        "n": len(y),
    }


def compute_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """Clinical metrics of one split.

    Parameters
    ----------
    y_true : np.ndarray
        Class indices, shape (N,).
    proba : np.ndarray
        Predicted probabilities, shape (N, C), rows summing to 1.

    Returns
    -------
    dict[str, float | None]
        Binary (C == 2): the keys of :data:`METRIC_NAMES`; ``ece`` is computed on
        p(positive); ``n`` and ``positives`` are counts. Multiclass: the keys of
        :data:`MULTICLASS_METRIC_NAMES`, with macro F1, one-vs-rest AUC averaged over the
        classes present, multiclass Brier (range [0, 2]) and top-label ECE. ``auc`` is
        ``None`` when fewer than two classes are present: AUC is undefined there, not 0.5.

    Raises
    ------
    MetricError
        On empty input, mismatched shapes, labels out of range or rows not summing to 1.
    """
    y, p = _check(y_true, proba)
    return _binary(y, p) if p.shape[1] == 2 else _multiclass(y, p)
