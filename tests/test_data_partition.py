"""Partitioners, the per-site split and simulated hospitals in load_federated."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import DataConfig
from common.data import DataError, Normaliser, SiteStats, load_federated
from common.data import carve as split_site
from common.data.partition import (
    parse_partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
)

Y = np.repeat([0, 1], [600, 400])  # 1000 rows, 40 % positive


def _covers(parts: list[np.ndarray], n: int) -> bool:
    return np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("natural", ("natural", None)),
        ("iid", ("iid", None)),
        ("dirichlet:0.3", ("dirichlet", 0.3)),
        ("quantity:2", ("quantity", 2.0)),
    ],
)
def test_parse_partition_accepts(text, expected):
    assert parse_partition(text) == expected


@pytest.mark.parametrize(
    "text", ["dirichlet", "dirichlet:0", "quantity:-1", "iid:3", "shards:2", ""]
)
def test_parse_partition_rejects(text):
    with pytest.raises(DataError, match="data.partition"):
        parse_partition(text)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: partition_iid(1000, 7, s),
        lambda s: partition_dirichlet(Y, 7, 0.5, s),
        lambda s: partition_quantity(1000, 7, 0.5, s),
    ],
    ids=["iid", "dirichlet", "quantity"],
)
def test_partitions_cover_every_index_once(make):
    parts = make(3)
    assert len(parts) == 7 and sum(len(p) for p in parts) == 1000
    assert _covers(parts, 1000)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: partition_iid(1000, 7, s),
        lambda s: partition_dirichlet(Y, 7, 0.5, s),
        lambda s: partition_quantity(1000, 7, 0.5, s),
    ],
    ids=["iid", "dirichlet", "quantity"],
)
def test_partitions_are_deterministic_per_seed(make):
    same = all(np.array_equal(a, b) for a, b in zip(make(5), make(5), strict=True))
    other = all(np.array_equal(a, b) for a, b in zip(make(5), make(6), strict=True))
    assert same and not other


def _label_skew(parts: list[np.ndarray]) -> float:
    """Mean absolute gap between each site's positive rate and the global one."""
    return float(np.mean([abs(Y[p].mean() - Y.mean()) for p in parts]))


def test_dirichlet_small_alpha_skews_labels_more():
    small = np.mean([_label_skew(partition_dirichlet(Y, 10, 0.1, s)) for s in range(5)])
    large = np.mean([_label_skew(partition_dirichlet(Y, 10, 100.0, s)) for s in range(5)])
    assert small > 0.2 and large < 0.05


def test_dirichlet_respects_min_size():
    parts = partition_dirichlet(Y, 50, 0.05, 0, min_size=5)
    assert min(len(p) for p in parts) >= 5 and _covers(parts, 1000)


def test_quantity_small_alpha_skews_sizes_more():
    def spread(alpha: float) -> float:
        return float(
            np.mean(
                [np.std([len(p) for p in partition_quantity(1000, 10, alpha, s)]) for s in range(5)]
            )
        )

    assert spread(0.1) > 3 * spread(100.0)


def test_quantity_respects_min_size():
    assert min(len(p) for p in partition_quantity(100, 20, 0.01, 0, min_size=3)) >= 3


def test_too_few_rows_for_the_sites_is_an_error():
    with pytest.raises(DataError, match="10 sites"):
        partition_quantity(15, 10, 1.0, 0)


def test_split_site_is_disjoint_stratified_and_non_empty():
    x = np.arange(100, dtype=np.float32)[:, None]
    y = np.repeat([0, 1], [70, 30])
    x_tr, y_tr, x_te, y_te = split_site(x, y, 0.3, 0)
    assert len(np.intersect1d(x_tr, x_te)) == 0 and len(x_tr) + len(x_te) == 100
    assert (int((y_te == 0).sum()), int((y_te == 1).sum())) == (21, 9)


def test_split_site_with_one_class_still_splits():
    x_tr, _, x_te, _ = split_site(np.zeros((5, 2)), np.ones(5, dtype=np.int64), 0.34, 0)
    assert (len(x_tr), len(x_te)) == (3, 2)


def test_split_site_with_two_rows_keeps_one_each():
    _, y_tr, _, y_te = split_site(np.zeros((2, 1)), np.array([0, 1]), 0.34, 0)
    assert (len(y_tr), len(y_te)) == (1, 1)


IDENTITY = SiteStats(Normaliser(mean=np.zeros(5), std=np.ones(5)))


def _synthetic(partition: str, seed: int = 0):
    cfg = DataConfig(
        source="synthetic",
        synthetic_sites=4,
        synthetic_features=5,
        synthetic_samples=400,
        partition=partition,
        num_sites=9,
        normalisation="bundle",
    )
    return load_federated(cfg, IDENTITY, seed=seed)


def test_simulated_hospitals_have_no_train_test_leakage():
    data = _synthetic("dirichlet:0.5")
    train = np.concatenate([s.x_train for s in data.sites])
    val = np.concatenate([s.x_val for s in data.sites])
    test = np.concatenate([s.x_test for s in data.sites])
    rows = {tuple(r) for r in train}
    assert len(rows) == len(train)  # every pooled train row used once
    assert not any(tuple(r) in rows for r in val)
    assert not any(tuple(r) in rows for r in test)
    assert not {tuple(r) for r in val} & {tuple(r) for r in test}


def test_simulated_hospitals_depend_on_the_seed():
    a, b = _synthetic("iid", seed=0), _synthetic("iid", seed=1)
    assert not np.array_equal(a.sites[0].x_train, b.sites[0].x_train)
    np.testing.assert_array_equal(a.sites[0].x_train, _synthetic("iid", seed=0).sites[0].x_train)


def test_simulated_sites_are_normalised_after_partitioning():
    cfg = DataConfig(
        source="synthetic",
        synthetic_sites=3,
        synthetic_features=4,
        partition="quantity:1.0",
        num_sites=5,
    )
    for s in load_federated(cfg).sites:
        if len(s.y_train) > 1:
            np.testing.assert_allclose(s.x_train.mean(0), 0.0, atol=1e-5)
