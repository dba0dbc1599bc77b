"""A site's own model: the adaptation guard, the one-class prior shift, calibration and the
decision threshold, all fitted on the validation split only (common/personalise.py,
common/scoring.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import AdaptationConfig, ModelConfig, OperatingPointConfig, OptimConfig
from common.data.splits import SiteSplit
from common.metrics import compute_metrics
from common.models import build_model, set_trainable
from common.personalise import personalise
from common.scoring import (
    OperatingPoint,
    fit_operating_point,
    fit_temperature,
    fit_threshold,
    logits64,
    predicts_one_class,
)

DEVICE = torch.device("cpu")
LOCAL = OptimConfig(lr=0.05, batch_size=16, steps=10)
OP = OperatingPointConfig(calibration="temperature", threshold="fixed:0.5")


def _site(rng: np.random.Generator, n: int, flip_train: bool = False,
          one_class: bool = False) -> SiteSplit:
    """Two informative features; `flip_train` inverts the training labels only."""
    def rows(m: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(m, 4)).astype(np.float32)
        y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(0, 0.5, m) > 0).astype(np.int64)
        return x, y

    xt, yt = rows(n)
    if flip_train:
        yt = 1 - yt
    xv, yv = rows(n // 2)
    if one_class:  # like Switzerland: training and validation rows all positive
        xt, yt = xt[yt == 1], yt[yt == 1]
        xv, yv = xv[yv == 1], yv[yv == 1]
    xs, ys = rows(n // 2)
    return SiteSplit("site", xt, yt, xv, yv, xs, ys)


def _model(seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
    torch.manual_seed(seed)
    model = build_model("mlp", (4,), 2, ModelConfig(hidden=(8,)))
    return model, set_trainable(model, "head")


def _train_global(model, site: SiteSplit) -> None:  # type: ignore[no-untyped-def]
    from common.training import train_local

    train_local(model, site.x_val, site.y_val, OptimConfig(lr=0.05, steps=200, batch_size=32),
                "all", DEVICE, 0)


def test_a_site_whose_adaptation_hurts_validation_keeps_the_global_model() -> None:
    rng = np.random.default_rng(0)
    site = _site(rng, 200, flip_train=True)  # fine-tuning on it can only hurt validation
    model, names = _model()
    _train_global(model, site)
    ad = AdaptationConfig(enabled=True, steps=60, lr=0.05, eval_every=1000, patience=1,
                          proximal_mu=0.0)
    result = personalise(model, site, names, "head", ad, LOCAL, OP, DEVICE, 0)
    assert result.kept == "global" and result.method == "fine-tune"
    assert "kept the global model" in result.reason
    g_state = model.state_dict()
    assert all(torch.equal(result.state[n], g_state[n]) for n in names)


def test_a_site_that_gains_on_validation_keeps_its_adapted_model() -> None:
    rng = np.random.default_rng(1)
    site = _site(rng, 400)
    model, names = _model()  # untrained: adaptation can only help
    ad = AdaptationConfig(enabled=True, steps=60, lr=0.05, eval_every=10, patience=3)
    result = personalise(model, site, names, "head", ad, LOCAL, OP, DEVICE, 0)
    assert result.kept == "adapted" and result.steps > 0
    mine = result.report["site_model"]["validation"]["loss"]
    theirs = result.report["global"]["validation"]["loss"]
    assert mine < theirs


def test_early_stopping_keeps_the_best_validation_step_not_the_last() -> None:
    rng = np.random.default_rng(2)
    site = _site(rng, 200)
    model, names = _model()
    ad = AdaptationConfig(enabled=True, steps=40, lr=0.05, eval_every=5, patience=100)
    result = personalise(model, site, names, "head", ad, LOCAL, OP, DEVICE, 0)
    assert result.steps % 5 == 0 and 0 < result.steps <= 40


def test_a_one_class_training_split_gets_a_bounded_intercept_shift_not_a_constant() -> None:
    rng = np.random.default_rng(3)
    site = _site(rng, 200, one_class=True)
    assert set(site.y_train) == {1}
    model, names = _model()
    _train_global(model, _site(np.random.default_rng(4), 200))
    before = model.head.bias.detach().clone()
    ad = AdaptationConfig(enabled=True, prior_shift_max=0.5)
    result = personalise(model, site, names, "head", ad, LOCAL, OP, DEVICE, 0)
    assert (result.method, result.kept) == ("prior-shift", "adapted")
    shift = result.state["head.bias"] - before
    delta = float(shift[1] - shift[0])
    assert 0 < delta <= 0.5 + 1e-6  # toward the site's (positive) prevalence, bounded
    assert torch.equal(result.state["head.weight"], model.state_dict()["head.weight"])
    x = np.concatenate([site.x_train, site.x_val])
    adapted, _ = _model()
    adapted.load_state_dict({**model.state_dict(), **result.state})
    assert not predicts_one_class(logits64(adapted, x), OperatingPoint())


def test_adaptation_off_keeps_the_global_model_with_the_sites_operating_point() -> None:
    rng = np.random.default_rng(5)
    site = _site(rng, 200)
    model, names = _model()
    _train_global(model, site)
    op_cfg = OperatingPointConfig(calibration="temperature", threshold="youden")
    result = personalise(model, site, names, "head", AdaptationConfig(enabled=False), LOCAL,
                         op_cfg, DEVICE, 0)
    assert (result.kept, result.method) == ("global", "none")
    assert result.op.rule == "youden" and result.op.fitted_on == "validation split (100 rows)"


def test_a_kept_model_that_answers_one_class_everywhere_is_said_to_be_constant() -> None:
    """Nothing better found, the global model stays: a constant answer must not ship
    silently, whatever its accuracy."""
    site = _site(np.random.default_rng(6), 200)
    model, names = _model()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 12.0]))  # always 'positive'
    result = personalise(model, site, names, "head", AdaptationConfig(enabled=False), LOCAL,
                         OP, DEVICE, 0)
    assert result.kept == "global"
    assert result.reason.endswith("WARNING: the kept model answers one class for every "
                                  "validation row, a constant predictor")
    honest = personalise(*_trained(site), "head", AdaptationConfig(enabled=False), LOCAL, OP,
                         DEVICE, 0)
    assert "constant predictor" not in honest.reason


def _trained(site: SiteSplit) -> tuple[torch.nn.Module, SiteSplit, list[str]]:
    model, names = _model()
    _train_global(model, site)
    return model, site, names


def test_the_test_split_chooses_nothing() -> None:
    """Permuting the test labels changes the reported test figures and nothing else."""
    rng = np.random.default_rng(6)
    site = _site(rng, 200)
    model, names = _model()
    ad = AdaptationConfig(enabled=True, steps=30, lr=0.05, eval_every=5)
    op_cfg = OperatingPointConfig(threshold="youden")
    a = personalise(model, site, names, "head", ad, LOCAL, op_cfg, DEVICE, 0)
    shuffled = SiteSplit(site.name, site.x_train, site.y_train, site.x_val, site.y_val,
                         site.x_test, np.random.default_rng(0).permutation(site.y_test))
    b = personalise(model, shuffled, names, "head", ad, LOCAL, op_cfg, DEVICE, 0)
    assert (a.kept, a.steps, a.op) == (b.kept, b.steps, b.op)
    assert all(torch.equal(a.state[n], b.state[n]) for n in names)
    assert a.report["site_model"]["validation"] == b.report["site_model"]["validation"]
    assert a.report["site_model"]["test"] != b.report["site_model"]["test"]


# ----------------------------------------------------------------- operating point


def _calibrated(rng: np.random.Generator, n: int, scale: float = 1.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Logits z with y ~ Bernoulli(sigmoid(z)); `scale` makes them over-confident."""
    z = rng.normal(0, 2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return np.column_stack([np.zeros(n), scale * z]), y


def test_a_well_calibrated_model_stays_within_ece_0_05() -> None:
    rng = np.random.default_rng(7)
    lv, yv = _calibrated(rng, 2000)
    op = fit_operating_point(lv, yv, OP)
    assert abs(op.temperature - 1.0) < 0.15
    lt, yt = _calibrated(rng, 4000)
    assert compute_metrics(yt, op.proba(lt))["ece"] < 0.05


def test_temperature_undoes_over_confidence() -> None:
    rng = np.random.default_rng(8)
    lv, yv = _calibrated(rng, 2000, scale=3.0)
    t = fit_temperature(lv, yv)
    assert 2.5 < t < 3.5
    lt, yt = _calibrated(rng, 4000, scale=3.0)
    raw = compute_metrics(yt, OperatingPoint().proba(lt))["ece"]
    fitted = compute_metrics(yt, OperatingPoint(temperature=t).proba(lt))["ece"]
    assert fitted < 0.05 < raw


@pytest.mark.parametrize(("rule", "check"), [
    ("sensitivity>=0.9", lambda m: m["sensitivity"] >= 0.9),
    ("specificity>=0.9", lambda m: m["specificity"] >= 0.9),
])
def test_constrained_threshold_rules_hold_on_validation(rule, check) -> None:
    rng = np.random.default_rng(9)
    lv, yv = _calibrated(rng, 500)
    p = OperatingPoint().proba(lv)[:, 1]
    threshold, note = fit_threshold(p, yv, rule)
    assert note is None
    assert check(compute_metrics(yv, np.column_stack([1 - p, p]), threshold))


def test_youden_threshold_maximises_sensitivity_plus_specificity_on_validation() -> None:
    rng = np.random.default_rng(10)
    lv, yv = _calibrated(rng, 300)
    p = OperatingPoint().proba(lv)[:, 1]
    t, _ = fit_threshold(p, yv, "youden")
    pp = np.column_stack([1 - p, p])
    best = compute_metrics(yv, pp, t)
    for other in np.linspace(0.05, 0.95, 19):
        m = compute_metrics(yv, pp, other)
        assert best["sensitivity"] + best["specificity"] >= \
            m["sensitivity"] + m["specificity"] - 1e-12


def test_fixed_threshold_and_one_class_fallback() -> None:
    p = np.array([0.2, 0.6, 0.7])
    assert fit_threshold(p, np.array([0, 1, 1]), "fixed:0.3") == (0.3, None)
    t, note = fit_threshold(p, np.array([1, 1, 1]), "youden")
    assert t == 0.5 and note is not None and "both classes" in note


def test_operating_point_from_a_manifest_is_checked() -> None:
    from common.scoring import OperatingPointError

    assert OperatingPoint.from_dict(None) == OperatingPoint()
    for bad in ({"temperature": 0.0}, {"threshold": 1.5}, {"temperature": "hot"},
                {"threshold": float("nan")}):
        with pytest.raises(OperatingPointError):
            OperatingPoint.from_dict(bad)
