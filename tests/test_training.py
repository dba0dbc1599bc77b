"""Local training: learns, is seeded, touches only trainable tensors, FedProx, edge sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ModelConfig, OptimConfig
from common.device import DeviceError, resolve_device, seed_everything
from common.models import SplitModel, build_model, frozen_features, split_state
from common.training import (
    TrainingError,
    evaluate,
    predict_proba,
    train_local,
    warmup_note,
)

CPU = torch.device("cpu")


def _toy(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs in 4 dimensions, separable along the first axis."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 4)).astype(np.float32) * 0.3
    x[:, 0] += np.where(y == 1, 2.0, -2.0)
    return x, y


def _model(hidden: tuple[int, ...] = (8, 8), dropout: float = 0.0) -> SplitModel:
    torch.manual_seed(0)
    return build_model("mlp", (4,), 2, ModelConfig(hidden=hidden, dropout=dropout))


def _state(model: SplitModel) -> dict[str, torch.Tensor]:
    backbone, head = split_state(model)
    return {**backbone, **head}


def _mean_ce(model: SplitModel, x: np.ndarray, y: np.ndarray) -> float:
    proba = predict_proba(model, x, CPU)
    return float(-np.mean(np.log(proba[np.arange(len(y)), y])))


def test_training_lowers_the_loss() -> None:
    x, y = _toy()
    model = _model()
    before = _mean_ce(model, x, y)
    result = train_local(model, x, y, OptimConfig(lr=0.05, steps=30), "all", CPU, seed=0)
    assert _mean_ce(model, x, y) < 0.5 * before
    assert (result.steps, result.num_examples) == (30, 64)


def test_same_seed_gives_identical_weights_and_loss() -> None:
    x, y = _toy()
    cfg = OptimConfig(lr=0.05, steps=10, batch_size=8)
    runs = []
    for global_seed in (11, 12):
        model = _model(dropout=0.3)
        torch.manual_seed(global_seed)  # the global RNG must not matter
        result = train_local(model, x, y, cfg, "all", CPU, seed=7)
        runs.append((result.loss, _state(model)))
    assert runs[0][0] == runs[1][0]
    for name, tensor in runs[0][1].items():
        assert torch.equal(tensor, runs[1][1][name]), name


def test_different_seed_gives_different_weights() -> None:
    x, y = _toy()
    cfg = OptimConfig(lr=0.05, steps=10, batch_size=8)
    a, b = _model(), _model()
    train_local(a, x, y, cfg, "all", CPU, seed=1)
    train_local(b, x, y, cfg, "all", CPU, seed=2)
    assert not torch.equal(a.head.weight, b.head.weight)


@pytest.mark.parametrize(
    ("trainable", "changed"),
    [
        ("head", {"head.weight", "head.bias"}),
        ("head+last-1", {"head.weight", "head.bias", "backbone.1.0.weight", "backbone.1.0.bias"}),
    ],
)
def test_only_trainable_tensors_change(trainable: str, changed: set[str]) -> None:
    x, y = _toy()
    model = _model()
    before = _state(model)
    cfg = OptimConfig(lr=0.05, steps=5, weight_decay=0.1)
    train_local(model, x, y, cfg, trainable, CPU, seed=0)
    after = _state(model)
    assert {n for n in before if not torch.equal(before[n], after[n])} == changed


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_backbone_lr_scale_slows_the_backbone_only(optimizer: str) -> None:
    # one step from the same weights on the same batch: the head moves as with scale 1, each
    # backbone tensor by the scale times its step (SGD: the update is lr x gradient; Adam:
    # its first step is lr x sign-like ratio, also linear in lr)
    x, y = _toy()
    start = _model()
    moved = {}
    for scale in (1.0, 0.25):
        model = _model()
        cfg = OptimConfig(optimizer=optimizer, lr=0.05, steps=1, batch_size=64,
                          backbone_lr_scale=scale)
        train_local(model, x, y, cfg, "all", CPU, seed=0)
        moved[scale] = {n: t - _state(start)[n] for n, t in _state(model).items()}
    for name, step in moved[1.0].items():
        expected = step if name.startswith("head.") else 0.25 * step
        torch.testing.assert_close(moved[0.25][name], expected, rtol=1e-4, atol=1e-7)
    assert any(float(step.abs().max()) > 0 for n, step in moved[1.0].items()
               if n.startswith("backbone."))


def test_training_leaves_global_rng_untouched() -> None:
    x, y = _toy()
    model = _model(dropout=0.3)
    torch.manual_seed(4)
    expected = torch.rand(3)
    torch.manual_seed(4)
    train_local(model, x, y, OptimConfig(steps=3), "all", CPU, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_epochs_count_whole_passes() -> None:
    x, y = _toy(n=20)
    result = train_local(_model(), x, y, OptimConfig(epochs=2, batch_size=8), "head", CPU, 0)
    assert result.steps == 6  # ceil(20 / 8) = 3 batches per pass


def test_cached_features_train_like_raw_inputs() -> None:
    x, y = _toy()
    cfg = OptimConfig(lr=0.05, steps=8, batch_size=16)
    # dropout: the frozen block must run in eval mode on raw inputs to match the cache
    raw, cached = _model(dropout=0.3), _model(dropout=0.3)
    train_local(raw, x, y, cfg, "head+last-1", CPU, seed=3)
    feats = frozen_features(cached, torch.as_tensor(x), "head+last-1")
    train_local(cached, feats, y, cfg, "head+last-1", CPU, seed=3, features_cached=True)
    for name, tensor in _state(raw).items():
        torch.testing.assert_close(tensor, _state(cached)[name])


def _drift(mu: float) -> float:
    x, y = _toy()
    model = _model()
    start = _state(model)
    cfg = OptimConfig(lr=0.05, steps=20, proximal_mu=mu)
    train_local(model, x, y, cfg, "head", CPU, seed=0, global_state=start)
    return float(torch.linalg.vector_norm(model.head.weight.detach() - start["head.weight"]))


def test_proximal_term_keeps_weights_near_global() -> None:
    free, held = _drift(0.0), _drift(1000.0)
    assert held < 0.1 * free


def test_proximal_anchor_is_the_given_global_state() -> None:
    x, y = _toy()
    model = _model()
    target = {"head.weight": torch.full((2, 8), 3.0), "head.bias": torch.zeros(2)}
    cfg = OptimConfig(optimizer="sgd", lr=0.001, steps=50, proximal_mu=1000.0)
    train_local(model, x, y, cfg, "head", CPU, seed=0, global_state=target)
    torch.testing.assert_close(model.head.weight, target["head.weight"], atol=0.05, rtol=0)


def test_one_class_site_trains() -> None:
    x, _ = _toy(n=10)
    y = np.ones(10, dtype=np.int64)
    result = train_local(_model(), x, y, OptimConfig(steps=3), "head", CPU, seed=0)
    assert np.isfinite(result.loss) and result.steps == 3


def test_training_restores_module_modes() -> None:
    x, y = _toy()
    model = _model(dropout=0.2).eval()
    train_local(model, x, y, OptimConfig(steps=2), "head+last-1", CPU, seed=0)
    assert not any(m.training for m in model.modules())


def test_labels_out_of_range_are_refused() -> None:
    x, y = _toy(n=8)
    y[0] = 2
    with pytest.raises(TrainingError, match="found 1 of 8 outside"):
        train_local(_model(), x, y, OptimConfig(), "head", CPU, seed=0)


def test_unknown_optimizer_is_refused() -> None:
    x, y = _toy(n=8)
    with pytest.raises(TrainingError, match="'adagrad'"):
        train_local(_model(), x, y, OptimConfig(optimizer="adagrad"), "head", CPU, seed=0)


def test_predict_proba_rows_sum_to_one() -> None:
    x, _ = _toy(n=9)
    proba = predict_proba(_model(), x, CPU, batch_size=4)
    assert proba.shape == (9, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_evaluate_reports_loss_and_metrics() -> None:
    x, y = _toy(n=12)
    model = _model()
    got = evaluate(model, x, y, CPU)
    assert got["loss"] == pytest.approx(_mean_ce(model, x, y))
    assert got["n"] == 12 and got["positives"] == 6


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_refuses_missing_cuda() -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")


def test_resolve_device_refuses_unknown_name() -> None:
    with pytest.raises(DeviceError, match="'tpu'"):
        resolve_device("tpu")


def test_seed_everything_repeats_initial_weights() -> None:
    seed_everything(5)
    first = build_model("mlp", (4,), 2, ModelConfig()).head.weight.detach().clone()
    seed_everything(5)
    assert torch.equal(first, build_model("mlp", (4,), 2, ModelConfig()).head.weight)


def test_balanced_softmax_learns_evidence_not_the_sites_prevalence() -> None:
    """On a site with 1 positive in 8, plain cross-entropy pulls p(positive) down everywhere;
    the balanced-softmax loss (logits + log prior) leaves the plain logits to the evidence."""
    rng = np.random.default_rng(0)
    y = (np.arange(160) % 8 == 0).astype(np.int64)
    x = rng.normal(size=(160, 4)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 1.0, -1.0)  # overlapping classes: the prior matters
    mean_positive = {}
    for loss in ("cross_entropy", "balanced_softmax"):
        model = _model(hidden=())
        train_local(model, x, y, OptimConfig(lr=0.05, steps=300, loss=loss), "all", CPU, 0)
        mean_positive[loss] = float(predict_proba(model, x, CPU)[:, 1].mean())
    assert mean_positive["cross_entropy"] == pytest.approx(1 / 8, abs=0.03)  # the prevalence
    # balanced: p(positive) as if both classes were equally likely: 0.875 x ~0.2 + 0.125 x ~0.8
    assert mean_positive["balanced_softmax"] > mean_positive["cross_entropy"] + 0.08


def test_unknown_loss_is_refused() -> None:
    x, y = _toy(8)
    with pytest.raises(TrainingError, match="loss 'focal' is unknown"):
        train_local(_model(), x, y, OptimConfig(steps=1, loss="focal"), "all", CPU, 0)


def test_a_warm_up_that_spans_the_whole_run_is_named() -> None:
    # configs/breast.yaml warms up for 10 of 160 rounds; a 5-round check of it trains no backbone
    note = warmup_note("all", 10, 5)
    assert note == ("federation.head_warmup_rounds is 10 and federation.rounds 5: every round "
                    "trains the head only, and the rest of trainable 'all' goes back to the "
                    "server as it was received")
    assert warmup_note("all", 5, 5) is not None  # round 5 is still a warm-up round
    assert warmup_note("all", 10, 11) is None
    assert warmup_note("head", 10, 5) is None  # the head alone was asked for anyway
