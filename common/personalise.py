"""A site's own model after federation: adapt only where it helps, then fit the operating point.

Personalisation never makes a site worse than the global model on its validation split, and is
never a constant predictor:

1. A site whose training split holds both classes fine-tunes the global weights, pulled
   toward them (``proximal_mu``) and stopped early on its validation split; a site whose
   training split holds one class gets a bounded intercept (prior-shift) correction instead,
   halved until the model still predicts both classes on the site's rows.
2. Guard: the site keeps the global model unless the candidate beats it on the validation
   split by the selection metric (log-loss by default) by more than ``min_improvement``.
3. Calibration (temperature) and the decision threshold are fitted on the validation split
   for whichever model is kept; a kept model that would answer one class everywhere on a
   two-class validation split falls back to threshold 0.5, then to the global model.

Every choice reads the validation split only. The test split is scored at the end, for the
report, and influences nothing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.config import AdaptationConfig, OperatingPointConfig, OptimConfig
from common.data.splits import TEST_LABEL, SiteSplit
from common.models import SplitModel
from common.scoring import (
    OperatingPoint,
    fit_operating_point,
    logits64,
    predicts_one_class,
    score,
    score_with_intervals,
)
from common.training import train_local

HIGHER_IS_BETTER = ("auc", "balanced_accuracy")
PRIOR_SHIFT_HALVINGS = 20


@dataclass
class SiteModel:
    """What one site keeps, why, and how it scores (validation and test)."""

    kept: str  # "adapted" | "global"
    method: str  # "fine-tune" | "prior-shift" | "none"
    reason: str
    state: dict[str, Tensor]  # trainable tensors of the kept model
    op: OperatingPoint
    steps: int  # fine-tuning steps kept (0 for global / prior shift)
    report: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-able: choice, reason, operating point and metrics."""
        return {"kept": self.kept, "method": self.method, "reason": self.reason,
                "steps": self.steps, "operating_point": self.op.to_dict(), **self.report}


def _better(metric: str, candidate: float | None, reference: float | None, margin: float
            ) -> bool:
    if candidate is None or reference is None:
        return False
    if metric in HIGHER_IS_BETTER:
        return candidate > reference + margin
    return candidate < reference - margin


def _selection(metric: str, m: dict[str, Any]) -> float | None:
    value = m.get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _trainable_state(model: SplitModel, names: list[str]) -> dict[str, Tensor]:
    state = model.state_dict()
    return {n: state[n].detach().cpu().clone() for n in names}


def _fine_tune(model: SplitModel, site: SiteSplit, names: list[str], trainable: str,
               ad: AdaptationConfig, local: OptimConfig, device: torch.device, seed: int,
               metric: str) -> tuple[dict[str, Tensor], int]:
    """Fine-tune from the global weights; the best state on validation by `metric`."""
    global_state = _trainable_state(model, names)
    best: dict[str, Any] = {"value": None, "state": global_state, "step": 0, "bad": 0}

    def check(step: int) -> bool:
        value = _selection(metric, score(logits64(model, site.x_val), site.y_val,
                                         OperatingPoint()))
        if step == 0 or _better(metric, value, best["value"], 0.0):
            best.update(value=value, state=_trainable_state(model, names), step=step, bad=0)
        else:
            best["bad"] += 1
        return bool(best["bad"] >= ad.patience)

    optim = replace(local, lr=ad.lr, steps=ad.steps, epochs=0, proximal_mu=ad.proximal_mu)
    train_local(model, site.x_train, site.y_train, optim, trainable, device, seed,
                global_state=global_state if ad.proximal_mu > 0 else None,
                check_every=ad.eval_every, check=check)
    return best["state"], int(best["step"])


def _prior_shift(model: SplitModel, site: SiteSplit, bound: float) -> str:
    """Shift the head's intercepts toward the site's prevalence; returns what was done.

    Only for binary heads. delta = logit(smoothed site prevalence) - logit(mean predicted
    p(positive) on the site's training rows), clipped to +-bound, halved until the model
    still gives both answers on the site's training and validation rows.
    """
    x = np.concatenate([site.x_train, site.x_val])
    n, n_pos = len(site.y_train), int(site.y_train.sum())
    prevalence = (n_pos + 1) / (n + 2)  # Laplace: a one-class site is not certain
    base = logits64(model, x)
    p_model = float(OperatingPoint().proba(base[: n])[:, 1].mean())
    p_model = min(max(p_model, 1e-6), 1 - 1e-6)
    delta = math.log(prevalence / (1 - prevalence)) - math.log(p_model / (1 - p_model))
    delta = max(-bound, min(bound, delta))
    shift = np.array([-delta / 2.0, delta / 2.0])
    if predicts_one_class(base, OperatingPoint()):
        return "the global model already gives one answer on this site's rows: no shift"
    for _ in range(PRIOR_SHIFT_HALVINGS):
        if not predicts_one_class(base + shift, OperatingPoint()):
            break
        shift /= 2.0
    else:
        return "every shift made the model answer one class: no shift"
    with torch.no_grad():
        model.head.bias.add_(torch.as_tensor(shift, dtype=model.head.bias.dtype))
    return f"intercept shifted by {shift[1] - shift[0]:+.3f} logits"


def personalise(
    model: SplitModel,
    site: SiteSplit,
    names: list[str],
    trainable: str,
    ad: AdaptationConfig,
    local: OptimConfig,
    op_cfg: OperatingPointConfig,
    device: torch.device,
    seed: int,
) -> SiteModel:
    """The site model of `site`, starting from `model` (the global model, left unchanged).

    `site` must be preprocessed with the site's own statistics; `ad.enabled` false skips
    steps 1-2 (the global model is kept, with the site's operating point).
    """
    metric = ad.selection_metric
    global_model = copy.deepcopy(model)
    g_val = logits64(global_model, site.x_val)
    g_val_metrics = score(g_val, site.y_val, OperatingPoint())
    if metric != "loss" and _selection(metric, g_val_metrics) is None:
        metric = "loss"  # e.g. AUC on a one-class validation split: undefined
    kept, method, reason, steps = "global", "none", "adaptation is off", 0
    candidate = copy.deepcopy(model)
    if ad.enabled:
        one_class = len(np.unique(site.y_train)) < 2
        if one_class and candidate.head.out_features == 2:
            method = "prior-shift"
            note = _prior_shift(candidate, site, ad.prior_shift_max)
        elif one_class:
            method, note = "none", "one-class training split and a multiclass head: no change"
        else:
            method = "fine-tune"
            state, steps = _fine_tune(candidate, site, names, trainable, ad, local, device,
                                      seed, metric)
            candidate.load_state_dict({**candidate.state_dict(), **state})
            note = (f"best on validation after {steps} of {ad.steps} steps" if steps
                    else f"none of {ad.steps} steps improved on validation")
        c_val = score(logits64(candidate, site.x_val), site.y_val, OperatingPoint())
        ours, theirs = _selection(metric, c_val), _selection(metric, g_val_metrics)
        if method != "none" and _better(metric, ours, theirs, ad.min_improvement):
            kept = "adapted"
            reason = (f"{note}; validation {metric} {_fmt(ours)} vs global {_fmt(theirs)}")
        else:
            steps = 0
            reason = (f"{note}; kept the global model: validation {metric} {_fmt(ours)} is not "
                      f"better than the global {_fmt(theirs)}")
    chosen = candidate if kept == "adapted" else global_model
    val_logits = logits64(chosen, site.x_val)
    op = fit_operating_point(val_logits, site.y_val, op_cfg)
    two_class_val = len(np.unique(site.y_val)) > 1
    if two_class_val and predicts_one_class(val_logits, op):
        op = OperatingPoint(op.temperature, 0.5, op.rule, op.fitted_on,
                            (*op.notes, "the fitted threshold answered one class on "
                             "validation: threshold 0.5"))
        if predicts_one_class(val_logits, op) and kept == "adapted":
            kept, chosen, steps = "global", global_model, 0
            reason += "; the adapted model answered one class on validation: kept the global"
            val_logits = logits64(chosen, site.x_val)
            op = fit_operating_point(val_logits, site.y_val, op_cfg)
    if two_class_val and predicts_one_class(val_logits, op):
        # nothing better was found: keep it, but never silently (a constant answer fails as
        # a diagnosis model whatever its accuracy)
        reason += ("; WARNING: the kept model answers one class for every validation row, a "
                   "constant predictor")
    g_test = logits64(global_model, site.x_test)
    report = {
        "site_model": {
            "validation": score_with_intervals(val_logits, site.y_val, op, seed),
            "test": {**score_with_intervals(logits64(chosen, site.x_test), site.y_test, op,
                                            seed), "label": TEST_LABEL}},
        "global": {
            "validation": score_with_intervals(g_val, site.y_val, OperatingPoint(), seed),
            "test": {**score_with_intervals(g_test, site.y_test, OperatingPoint(), seed),
                     "label": TEST_LABEL}},
        "rows": site.sizes(),
    }
    return SiteModel(kept, method, reason, _trainable_state(chosen, names), op, steps, report)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"
