"""Scoring a model the way a hospital uses it: logits, calibration, a decision threshold.

One path for everything that reports a figure somebody will rely on: the sites' validation
and test metrics of every round, the site models' reports, ``medfed evaluate`` and
``medfed predict``. Logits are computed in float64 on the CPU by a full forward pass (no
feature cache, fixed batching), so the same bundle on the same rows gives the same numbers
wherever it runs: ``predict`` and ``evaluate`` reproduce what was reported to 1e-9.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.config import OperatingPointConfig
from common.metrics import bootstrap_intervals, compute_metrics
from common.models import SplitModel

SCORE_BATCH = 4096
TEMPERATURE_RANGE = (0.05, 20.0)


class OperatingPointError(ValueError):
    """An operating point (temperature, threshold) read from a manifest is invalid."""


@dataclass(frozen=True)
class OperatingPoint:
    """How logits become probabilities (temperature) and decisions (threshold)."""

    temperature: float = 1.0
    threshold: float = 0.5  # binary: positive when calibrated p(positive) > threshold
    rule: str = "fixed:0.5"
    fitted_on: str | None = None  # e.g. "validation split (34 rows)"; None: not fitted
    notes: tuple[str, ...] = field(default=())  # why a rule fell back, in words

    def proba(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated softmax probabilities (float64)."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=1, keepdims=True))

    def decide(self, p: np.ndarray) -> np.ndarray:
        """Class decided per row from calibrated probabilities `p` (int64)."""
        if p.shape[1] == 2:
            return np.asarray(p[:, 1] > self.threshold, dtype=np.int64)
        return np.asarray(p.argmax(axis=1), dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        """JSON form stored in a manifest."""
        return {"temperature": self.temperature, "threshold": self.threshold, "rule": self.rule,
                "fitted_on": self.fitted_on, "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: Any) -> OperatingPoint:
        """Inverse of :meth:`to_dict`, checked (a manifest is input from another party)."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise OperatingPointError("manifest key 'operating_point' must be a mapping")
        t, thr = d.get("temperature", 1.0), d.get("threshold", 0.5)
        for key, value in (("temperature", t), ("threshold", thr)):
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise OperatingPointError(f"manifest key 'operating_point.{key}' must be a "
                                          "finite number")
        lo, hi = TEMPERATURE_RANGE
        if not lo <= t <= hi or not 0.0 <= thr <= 1.0:
            raise OperatingPointError(
                f"manifest key 'operating_point' has temperature {t:g} (allowed {lo:g}-{hi:g}) "
                f"or threshold {thr:g} (allowed 0-1) out of range")
        notes = d.get("notes") or []
        return cls(float(t), float(thr), str(d.get("rule", "fixed")),
                   None if d.get("fitted_on") is None else str(d["fitted_on"]),
                   tuple(str(n) for n in notes if isinstance(n, str)))


def logits64(model: SplitModel, x: np.ndarray) -> np.ndarray:
    """Logits of a full forward pass in float64 on the CPU (N, C)."""
    return _logits_of(_float64_copy(model), x)


def _float64_copy(model: SplitModel) -> SplitModel:
    return copy.deepcopy(model).to("cpu").double().eval()


def _logits_of(ref: SplitModel, x: np.ndarray) -> np.ndarray:
    inputs = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    parts = []
    with torch.no_grad():
        for start in range(0, max(len(inputs), 1), SCORE_BATCH):
            parts.append(ref(inputs[start:start + SCORE_BATCH]).numpy())
    return np.concatenate(parts)


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-probability of the true class (clipped: never infinite)."""
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None))))


def score(logits: np.ndarray, y: np.ndarray, op: OperatingPoint) -> dict[str, float | None]:
    """Log-loss of the calibrated probabilities plus every clinical metric at `op`."""
    p = op.proba(logits)
    y = np.asarray(y, dtype=np.int64)
    return {"loss": _log_loss(p, y), **compute_metrics(y, p, op.threshold)}


def score_model(model: SplitModel, x: np.ndarray, y: np.ndarray, op: OperatingPoint
                ) -> dict[str, float | None]:
    """:func:`score` of a model's float64 logits."""
    return score(logits64(model, x), y, op)


def score_splits(model: SplitModel, splits: list[tuple[np.ndarray, np.ndarray]],
                 op: OperatingPoint) -> list[dict[str, float | None]]:
    """:func:`score_model` on each (x, y), from one float64 copy of the model."""
    ref = _float64_copy(model)
    return [score(_logits_of(ref, x), y, op) for x, y in splits]


INTERVAL_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy")


def score_with_intervals(logits: np.ndarray, y: np.ndarray, op: OperatingPoint, seed: int = 0
                         ) -> dict[str, float | None]:
    """:func:`score` plus seeded 95% bootstrap bounds `<metric>_lo` / `<metric>_hi`."""
    out = score(logits, y, op)
    bounds = bootstrap_intervals(np.asarray(y, dtype=np.int64), op.proba(logits), op.threshold,
                                 seed=seed)
    for key in INTERVAL_METRICS:
        pair = bounds.get(key)
        out[f"{key}_lo"], out[f"{key}_hi"] = (None, None) if pair is None else pair
    return out


# --------------------------------------------------------------- fitting on validation


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return _log_loss(OperatingPoint(temperature=temperature).proba(logits), y)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation log-loss, within :data:`TEMPERATURE_RANGE`."""
    lo, hi = TEMPERATURE_RANGE
    from scipy.optimize import minimize_scalar  # only when calibrating: keeps imports light

    res = minimize_scalar(lambda u: _nll(logits, y, math.exp(u)),
                          bounds=(math.log(lo), math.log(hi)), method="bounded",
                          options={"xatol": 1e-6})
    return float(min(max(math.exp(res.x), lo), hi))


def _candidates(p: np.ndarray) -> np.ndarray:
    """Thresholds between consecutive distinct scores, plus both ends."""
    s = np.unique(p)
    mids = (s[:-1] + s[1:]) / 2.0
    return np.concatenate([[0.0], mids, [min(1.0, float(s[-1]))]])


def fit_threshold(p: np.ndarray, y: np.ndarray, rule: str, min_class_rows: int = 1
                  ) -> tuple[float, str | None]:
    """A decision threshold on validation p(positive) by `rule`; (threshold, note or None).

    youden maximises sensitivity + specificity (ties: the threshold nearest 0.5);
    sensitivity>=X takes the highest threshold that keeps sensitivity >= X (so specificity is
    as high as it can be); specificity>=X the lowest keeping specificity >= X. A rule needs
    `min_class_rows` validation rows of each class, else the threshold stays 0.5.
    """
    if rule.startswith("fixed"):
        return (float(rule.split(":", 1)[1]) if ":" in rule else 0.5), None
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return 0.5, f"rule {rule} needs both classes in the validation split: threshold 0.5"
    fewest = int(min(pos.sum(), neg.sum()))
    if fewest < min_class_rows:
        return 0.5, (f"rule {rule} needs {min_class_rows} validation rows of each class, the "
                     f"smaller class has {fewest}: threshold 0.5")
    cands = _candidates(p)
    pred = p[None, :] > cands[:, None]
    sens = (pred & pos).sum(axis=1) / pos.sum()
    spec = (~pred & neg).sum(axis=1) / neg.sum()
    if rule == "youden":
        j = sens + spec
        best = np.flatnonzero(np.isclose(j, j.max()))
        return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]]), None
    name, target = rule.split(">=")
    ok = (sens if name == "sensitivity" else spec) >= float(target) - 1e-12
    if not ok.any():
        return 0.5, f"no threshold reaches {rule} on validation: threshold 0.5"
    idx = np.flatnonzero(ok)
    return float(cands[idx.max() if name == "sensitivity" else idx.min()]), None


def fit_operating_point(logits: np.ndarray, y: np.ndarray, cfg: OperatingPointConfig
                        ) -> OperatingPoint:
    """Temperature then threshold, both fitted on a validation split only."""
    y = np.asarray(y, dtype=np.int64)
    notes: list[str] = []
    temperature = 1.0
    if cfg.calibration == "temperature":
        if len(np.unique(y)) < 2:
            notes.append("validation split has one class: not calibrated (temperature 1)")
        else:
            temperature = fit_temperature(logits, y)
    threshold = 0.5
    if logits.shape[1] == 2:
        p = OperatingPoint(temperature=temperature).proba(logits)[:, 1]
        threshold, note = fit_threshold(p, y, cfg.threshold, cfg.min_class_rows)
        if note:
            notes.append(note)
    return OperatingPoint(temperature, threshold, cfg.threshold,
                          f"validation split ({len(y)} rows)", tuple(notes))


def predicts_one_class(logits: np.ndarray, op: OperatingPoint) -> bool:
    """True when every row gets the same decision at `op` (a constant predictor)."""
    return len(np.unique(op.decide(op.proba(logits)))) < 2
