"""Image augmentation: what each operation does, seeding, and where it is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.augment import MAX_SHIFT, augment_batch, parse_augment
from common.config import ConfigError, ModelConfig, OptimConfig
from common.config_check import load_config
from common.models import build_model
from common.training import TrainingError, train_local

CPU = torch.device("cpu")
ALL = ("flip", "shift", "intensity")


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_parse_augment() -> None:
    assert parse_augment("none") == ()
    assert parse_augment("shift+flip") == ("shift", "flip")
    with pytest.raises(ValueError, match="'rotate' is unknown"):
        parse_augment("flip+rotate")
    with pytest.raises(ValueError, match="twice"):
        parse_augment("flip+flip")


def test_same_seed_same_batch_and_the_input_is_untouched() -> None:
    x = _images()
    before = x.clone()
    a = augment_batch(x, ALL, torch.Generator().manual_seed(3))
    b = augment_batch(x, ALL, torch.Generator().manual_seed(3))
    c = augment_batch(x, ALL, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    torch.testing.assert_close(x, before)
    assert a.shape == x.shape


def test_flip_mirrors_some_images_and_keeps_the_others() -> None:
    x = _images(64)
    out = augment_batch(x, ("flip",), torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_shift_is_a_window_of_the_edge_padded_image() -> None:
    x = _images(32)
    out = augment_batch(x, ("shift",), torch.Generator().manual_seed(1))
    s = MAX_SHIFT
    moved = 0
    for o, i in zip(out, x, strict=True):
        padded = np.pad(i.numpy(), ((0, 0), (s, s), (s, s)), mode="edge")
        windows = [(dy, dx) for dy in range(2 * s + 1) for dx in range(2 * s + 1)
                   if np.array_equal(padded[:, dy:dy + 12, dx:dx + 12], o.numpy())]
        assert windows, "a shifted image must be a window of the padded original"
        moved += windows[0] != (s, s)
    assert moved > 16


def test_intensity_is_an_affine_change_within_bounds() -> None:
    x = _images(8)
    out = augment_batch(x, ("intensity",), torch.Generator().manual_seed(2))
    for o, i in zip(out, x, strict=True):
        scale, offset = np.polyfit(i.flatten().numpy(), o.flatten().numpy(), 1)
        assert 0.9 - 1e-6 <= scale <= 1.1 + 1e-6 and -0.1 - 1e-6 <= offset <= 0.1 + 1e-6


def test_augmented_training_differs_from_plain_and_repeats_with_its_seed() -> None:
    x, y = _images(40).numpy(), np.arange(40) % 2

    def trained(augment: str, seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = build_model("cnn", (1, 12, 12), 2, ModelConfig(family="cnn", channels=(4,)))
        train_local(model, x, y, OptimConfig(steps=5, augment=augment), "all", CPU, seed)
        return model.head.weight.detach().clone()

    torch.testing.assert_close(trained("flip+shift", 7), trained("flip+shift", 7))
    assert not torch.equal(trained("flip+shift", 7), trained("none", 7))


def test_augmentation_is_refused_on_tabular_rows_and_cached_features() -> None:
    model = build_model("mlp", (5,), 2, ModelConfig())
    x, y = np.zeros((8, 5), np.float32), np.arange(8) % 2
    with pytest.raises(TrainingError, match=r"image inputs \(N, C, H, W\), got shape \(8, 5\)"):
        train_local(model, x, y, OptimConfig(steps=1, augment="flip"), "all", CPU, 0)
    with pytest.raises(TrainingError, match="cached frozen features"):
        train_local(model, x, y, OptimConfig(steps=1, augment="flip"), "head", CPU, 0,
                    features_cached=True)


def test_config_names_the_augment_key() -> None:
    with pytest.raises(ConfigError, match=r"'federation.local.augment'.*'blur' is unknown"):
        load_config("configs/breast.yaml", ["federation.local.augment=flip+blur"])
    with pytest.raises(ConfigError, match=r"'pretrain.optim.augment'"):
        load_config("configs/breast.yaml", ["pretrain.optim.augment=Flip"])
