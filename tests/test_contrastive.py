"""Self-supervised pretraining (`pretrain.objective: simclr`): views, loss, the bundle's recipe."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from common.bundle import load_bundle
from common.config import ConfigError, ContrastiveConfig
from common.config_check import load_config
from common.contrastive import random_view, simclr, to_channels
from common.data.medmnist import load_medmnist_sites
from common.data.schema import DataError
from common.models import build_model
from common.pretrain import pretrain
from tests.conftest import BREAST

CPU = torch.device("cpu")
# a few steps of everything: what is checked is the recipe, not how good the backbone gets
SMALL = ("model.channels=[4]", "pretrain.optim.epochs=1", "pretrain.objective=simclr",
         "pretrain.contrastive.steps=3", "pretrain.contrastive.batch_size=8")


def test_grey_is_luminance_and_colour_repeats_grey() -> None:
    rgb = np.zeros((2, 3, 4, 4), np.float32)
    rgb[0, 0], rgb[1, 1] = 1.0, 1.0  # a red and a green image
    grey = to_channels(rgb, 1, "here")
    assert grey.shape == (2, 1, 4, 4) and grey.dtype == np.float32
    assert np.allclose(grey[0], 0.299) and np.allclose(grey[1], 0.587)
    assert np.array_equal(to_channels(grey, 3, "here")[:, 2], grey[:, 0])
    with pytest.raises(ValueError, match="^here: images with 2 channels cannot"):
        to_channels(np.zeros((1, 2, 4, 4), np.float32), 1, "here")


def test_views_differ_between_draws_and_repeat_with_the_seed() -> None:
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    one = random_view(x, torch.Generator().manual_seed(1))
    again = random_view(x, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    first, second = random_view(x, g), random_view(x, g)
    assert torch.equal(one, again) and torch.equal(one, first)
    assert not torch.allclose(first, second)  # the two views of a pair are not the same
    assert one.shape == x.shape and not torch.allclose(one, x)


def _cnn() -> torch.nn.Module:
    cfg = load_config(BREAST, ["model.channels=[4, 8]"])
    torch.manual_seed(0)
    return build_model("cnn", (1, 28, 28), 2, cfg.model)


def test_simclr_trains_the_backbone_only_and_repeats_with_its_seed() -> None:
    x = np.random.default_rng(0).normal(size=(40, 1, 28, 28)).astype(np.float32)
    cfg = ContrastiveConfig(steps=4, batch_size=8)
    runs = []
    for _ in range(2):
        model = _cnn()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss = simclr(model, x, cfg, seed=3, device=CPU)
        runs.append((model.state_dict(), loss))
        assert np.isfinite(loss) and loss > 0
        assert torch.equal(model.head.weight, before["head.weight"])  # labels come later
        assert not torch.equal(model.state_dict()["backbone.0.0.weight"],
                               before["backbone.0.0.weight"])
    (first, loss_1), (second, loss_2) = runs
    assert loss_1 == loss_2 and all(torch.equal(first[k], second[k]) for k in first)


def test_the_loss_falls_as_the_backbone_learns_to_pair_the_views() -> None:
    # 8 stripe patterns (4 frequencies, 2 orientations) that survive crops and contrast
    wave = np.sin(2 * np.pi * np.arange(28)[None, :] * np.arange(1, 5)[:, None] / 28)
    x = np.stack([*(np.tile(w, (28, 1)) for w in wave), *(np.tile(w[:, None], (1, 28))
                                                          for w in wave)])
    x = (2 * x[:, None]).astype(np.float32)
    losses = [simclr(_cnn(), x, ContrastiveConfig(steps=steps, batch_size=8, lr=0.01), seed=0,
                     device=CPU) for steps in (1, 60)]
    assert losses[1] < losses[0] - 0.3, losses


def test_pretraining_by_simclr_records_its_recipe_and_the_images_it_learnt_from(
        tmp_path: Path, signing_key) -> None:
    cfg = load_config(BREAST, [*SMALL, "pretrain.contrastive.also_medmnist=[retina]"])
    manifest = pretrain(cfg, tmp_path / "b", signing_key)
    assert manifest["source"] == ("medmnist/pneumonia:all:train"
                                  "+simclr(medmnist/retina:train:grey)")
    recipe = manifest["config"]["pretrain"]
    assert recipe["objective"] == "simclr"
    assert recipe["contrastive"] == {"steps": 3, "batch_size": 8, "lr": 0.002,
                                     "temperature": 0.2, "also_medmnist": ["retina"]}
    # the bundle's normalisation is that of every image the backbone saw: pneumonia's and
    # retina's in grey, pooled
    _, (pneumonia,) = load_medmnist_sites("pneumonia")
    _, (retina,) = load_medmnist_sites("retina")
    pooled = np.concatenate([pneumonia.x_train, to_channels(retina.x_train, 1, "retina")])
    stored = json.dumps(manifest["preprocessing"]["normalisation"])
    mean = manifest["preprocessing"]["normalisation"]["mean"]
    assert np.allclose(mean, [pooled.mean()], atol=1e-5), stored
    assert not np.allclose(mean, [pneumonia.x_train.mean()], atol=1e-3)
    bundle = load_bundle(tmp_path / "b", signing_key.public_key(), require_signature=True)
    assert bundle.manifest["labels"] == ["normal", "pneumonia"]  # the head: source classes


def test_the_source_names_each_set_and_the_conversion_it_went_through() -> None:
    from common.pretrain import SourceData, source_name

    def named(source: str, also: str, shape: tuple[int, ...]) -> str:
        cfg = load_config(BREAST, [*SMALL, f"pretrain.data.medmnist={source}",
                                   f"pretrain.contrastive.also_medmnist=[{also}]",
                                   "federation.data.medmnist=pneumonia" if "breast" in also
                                   else "federation.data.medmnist=breast"])
        spec = types.SimpleNamespace(input_shape=shape)
        site = types.SimpleNamespace(name="all")
        return source_name(cfg, SourceData(spec, (site,), "train"))  # type: ignore[arg-type]

    assert named("retina", "breast", (3, 28, 28)) == (
        "medmnist/retina:all:train+simclr(medmnist/breast:train:3-channel)")
    assert named("pneumonia", "retina", (1, 28, 28)) == (
        "medmnist/pneumonia:all:train+simclr(medmnist/retina:train:grey)")


def test_supervised_pretraining_is_unchanged_by_the_contrastive_keys(tmp_path: Path,
                                                                     signing_key) -> None:
    # the contrastive block is read only under objective simclr (the steps differ here)
    base = ["model.channels=[4]", "pretrain.optim.epochs=1", "pretrain.objective=supervised"]
    a = pretrain(load_config(BREAST, base), tmp_path / "a", signing_key)
    b = pretrain(load_config(BREAST, [*base, "pretrain.contrastive.steps=7"]), tmp_path / "b",
                 signing_key)
    assert a["source"] == "medmnist/pneumonia:all:train"
    assert a["files"] == b["files"]  # the same tensors, hash for hash


@pytest.mark.parametrize(("extra", "message"), [
    (["pretrain.objective=byol"],
     "'pretrain.objective' must be one of supervised, simclr, got 'byol'"),
    (["pretrain.objective=supervised", "pretrain.contrastive.also_medmnist=[retina]"],
     "'pretrain.contrastive.also_medmnist' is used only by pretrain.objective simclr"),
    (["pretrain.contrastive.also_medmnist=[breast]"],
     "'pretrain.contrastive.also_medmnist[0]' names 'breast', the federation's own set"),
    (["pretrain.contrastive.also_medmnist=[retina, retina]"],
     "'pretrain.contrastive.also_medmnist[1]' names 'retina' a second time"),
    (["pretrain.contrastive.also_medmnist=[pneumonia]"],
     "'pretrain.contrastive.also_medmnist[0]' names 'pneumonia', pretrain.data's own set"),
    (["pretrain.contrastive.also_medmnist=[chest]"],
     "'pretrain.contrastive.also_medmnist[0]' must be one of breast, pneumonia, retina"),
    (["pretrain.contrastive.batch_size=1"],
     "'pretrain.contrastive.batch_size' must be at least 2, got 1"),
    (["pretrain.contrastive.temperature=0"], "'pretrain.contrastive.temperature' must be"),
    (["pretrain.data.source=heart"], "'pretrain.objective' simclr needs images"),
])
def test_the_contrastive_keys_are_checked_with_one_sentence(extra, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(BREAST, ["pretrain.objective=simclr", *extra])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_set_of_another_image_size_is_refused_before_training(tmp_path: Path, signing_key,
                                                                monkeypatch) -> None:
    import common.pretrain as module

    real = module.load_medmnist_split

    def bigger(name: str, split: str):  # a 64x64 edition of RetinaMNIST, as MedMNIST+ ships
        x, y, spec = real(name, split)
        return (np.zeros((3, 3, 64, 64), np.float32), y[:3], spec) if name == "retina" else \
            (x, y, spec)

    monkeypatch.setattr(module, "load_medmnist_split", bigger)
    cfg = load_config(BREAST, [*SMALL, "pretrain.contrastive.also_medmnist=[retina]"])
    with pytest.raises(DataError, match=r"also_medmnist\[0\]' \(retina\): images of shape "
                                        r"\[1, 64, 64\] cannot join the source's \[1, 28, 28\]"):
        pretrain(cfg, tmp_path / "b", signing_key)
    assert not (tmp_path / "b").exists()
