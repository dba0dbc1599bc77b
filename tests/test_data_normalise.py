"""Normaliser: per-feature and per-channel statistics, constant features, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.data import DataError, Normaliser


def test_tabular_statistics_per_feature():
    x = np.array([[1.0, 10.0], [3.0, 10.0], [5.0, 10.0]])
    norm = Normaliser.fit(x)
    np.testing.assert_allclose(norm.mean, [3.0, 10.0])
    np.testing.assert_allclose(norm.std, [2.0, 1.0])  # sample std; constant column -> 1
    np.testing.assert_allclose(norm.apply(x), [[-1, 0], [0, 0], [1, 0]])


def test_apply_returns_float32():
    assert Normaliser.fit(np.ones((4, 3))).apply(np.ones((2, 3))).dtype == np.float32


def test_image_statistics_per_channel():
    x = np.zeros((2, 3, 2, 2))
    x[:, 1] = 1.0
    x[0, 2], x[1, 2] = 0.0, 2.0
    norm = Normaliser.fit(x)
    np.testing.assert_allclose(norm.mean, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(norm.std, [1.0, 1.0, np.std([0] * 4 + [2] * 4, ddof=1)])
    assert norm.apply(x).shape == (2, 3, 2, 2)


def test_single_row_gets_unit_std():
    np.testing.assert_array_equal(Normaliser.fit(np.array([[4.0, 5.0]])).std, [1.0, 1.0])


def test_round_trip_through_json():
    norm = Normaliser.fit(np.random.default_rng(0).normal(size=(20, 4)))
    back = Normaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
    np.testing.assert_array_equal(back.mean, norm.mean)
    np.testing.assert_array_equal(back.std, norm.std)


def test_shape_mismatch_is_an_error():
    with pytest.raises(DataError, match="3 features"):
        Normaliser.fit(np.ones((4, 3))).apply(np.ones((2, 5)))


def test_from_dict_rejects_non_positive_std():
    with pytest.raises(DataError, match="std"):
        Normaliser.from_dict({"mean": [0.0], "std": [0.0]})
