"""MedMNIST files: shapes, dtypes, labels, validation, and prediction image input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.config import DataConfig
from common.data import DataError, load_federated, load_source_split
from common.data.medmnist import load_image_file, load_medmnist_sites, load_medmnist_split

EXPECTED = {  # name: (channels, classes, train, val, test) from the MedMNIST README
    "breast": (1, 2, 546, 78, 156),
    "pneumonia": (1, 2, 4708, 524, 624),
    "retina": (3, 5, 1080, 120, 400),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_splits_have_official_shapes_and_dtypes(name):
    channels, classes, *sizes = EXPECTED[name]
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        x, y, spec = load_medmnist_split(name, split)
        assert x.shape == (n, channels, 28, 28) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
        assert spec.num_classes == classes == len(spec.labels)
        assert set(np.unique(y)) == set(range(classes))


def test_breast_positive_class_is_malignant():
    # the file labels malignant 0 (README); medfed's class 1, the finding sensitivity counts
    spec, sites = load_medmnist_sites("breast")
    assert spec.labels == ("normal/benign", "malignant")
    assert [s.name for s in sites] == ["all"]
    assert int((sites[0].y_train == 1).sum()) == 147  # malignant in train
    assert int((sites[0].y_train == 0).sum()) == 399
    assert [int((s.y_test == 1).sum()) for s in sites] == [42]


def test_federated_breast_over_simulated_hospitals_uses_the_official_splits():
    cfg = DataConfig(source="medmnist", medmnist="breast", partition="dirichlet:1.0", num_sites=4)
    data = load_federated(cfg, seed=0)
    # official train / val / test: 546 / 78 / 156 images, each spread over the hospitals
    assert sum(len(s.y_train) for s in data.sites) == 546
    assert sum(len(s.y_val) for s in data.sites) == 78
    assert sum(len(s.y_test) for s in data.sites) == 156
    assert all(min(s.sizes().values()) > 0 for s in data.sites)


def test_each_hospital_keeps_its_label_mix_in_validation_and_test():
    cfg = DataConfig(source="medmnist", medmnist="breast", partition="dirichlet:0.3", num_sites=3)
    for s in load_federated(cfg, seed=2).sites:
        train, test = s.y_train.mean(), s.y_test.mean()
        assert abs(train - test) < 0.2, (s.name, train, test)


def test_official_val_split_is_the_validation_split():
    x, _, _ = load_source_split(DataConfig(source="medmnist", medmnist="retina"), "val")
    assert x.shape == (120, 3, 28, 28)
    with pytest.raises(DataError, match="pretrain.split"):
        load_source_split(DataConfig(source="heart"), "holdout")


def test_unknown_dataset_names_the_key():
    with pytest.raises(DataError, match="data.medmnist"):
        load_medmnist_split("chest", "train")


def _fake_npz(path, **override):
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = np.zeros((n, 1), np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"val_labels": None}, "val_labels"),
        ({"train_images": np.zeros((4, 28, 28), np.float32)}, "train_images"),
        ({"test_images": np.zeros((2, 32, 32), np.uint8)}, "test_images"),
        ({"test_labels": np.full((2, 1), 3, np.uint8)}, "test_labels"),
    ],
)
def test_bad_npz_is_named(tmp_path, override, fragment):
    _fake_npz(tmp_path / "breastmnist.npz", **override)
    with pytest.raises(DataError, match=f"breastmnist.npz.*{fragment}"):
        load_medmnist_split("breast", "train", data_dir=tmp_path)


def test_image_file_npz_uint8_grey(tmp_path):
    images = np.arange(2 * 28 * 28).reshape(2, 28, 28).astype(np.uint8)
    np.savez(tmp_path / "new.npz", images=images, other=np.zeros(3))
    x = load_image_file(tmp_path / "new.npz")
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], images / 255.0, rtol=1e-6)


def test_image_file_channels_last_rgb(tmp_path):
    images = np.zeros((3, 28, 28, 3), np.uint8)
    images[..., 2] = 255
    np.savez(tmp_path / "rgb.npz", images)  # no "images" key: the first array
    x = load_image_file(tmp_path / "rgb.npz")
    assert x.shape == (3, 3, 28, 28) and x[:, 2].min() == 1.0 and x[:, :2].max() == 0.0


def test_image_file_float_outside_unit_range_is_named(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.full((2, 28, 28), 7.0))
    with pytest.raises(DataError, match=r"f\.npz.*outside \[0, 1\]"):
        load_image_file(tmp_path / "f.npz")


def test_image_folder_of_pngs(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((28, 28), 51 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    x = load_image_file(tmp_path)
    assert x.shape == (3, 1, 28, 28)
    np.testing.assert_allclose(x[:, 0, 0, 0], [0.0, 0.2, 0.4], rtol=1e-6)
