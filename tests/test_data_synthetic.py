"""Synthetic hospitals: labelled as synthetic, unequal, label-skewed, learnable, fast."""

from __future__ import annotations

import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from common.config import DataConfig
from common.data import load_federated
from common.data.synthetic import load_synthetic_sites, site_sizes

CFG = DataConfig(
    source="synthetic", synthetic_sites=6, synthetic_features=13, synthetic_samples=1200
)


def test_sites_are_named_synthetic():
    spec, sites = load_synthetic_sites(CFG)
    assert [s.name for s in sites] == [f"synthetic-site-0{i}" for i in range(6)]
    assert spec.labels == ("synthetic-negative", "synthetic-positive")
    assert spec.feature_names[:2] == ("f00", "f01") and spec.input_shape == (13,)


def test_site_sizes_are_geometric_and_sum_to_the_total():
    sizes = site_sizes(1200, 6)
    assert sizes.sum() == 1200 and np.all(np.diff(sizes) < 0)
    assert 8 < sizes[0] / sizes[-1] < 11


def test_tiny_totals_still_give_every_site_four_rows():
    sizes = site_sizes(100, 1000)
    assert sizes.min() == 4 and sizes.sum() == 4000


def test_label_prevalence_differs_between_sites():
    _, sites = load_synthetic_sites(CFG)
    rates = [np.concatenate([s.y_train, s.y_test]).mean() for s in sites]
    assert max(rates) - min(rates) > 0.25


def test_deterministic():
    a, b = load_synthetic_sites(CFG)[1], load_synthetic_sites(CFG)[1]
    assert all(np.array_equal(s.x_train, t.x_train) for s, t in zip(a, b, strict=True))


def test_learnable_by_one_global_model():
    _, sites = load_synthetic_sites(CFG)
    x_tr = np.concatenate([s.x_train for s in sites])
    y_tr = np.concatenate([s.y_train for s in sites])
    x_te = np.concatenate([s.x_test for s in sites])
    y_te = np.concatenate([s.y_test for s in sites])
    model = LogisticRegression().fit(x_tr, y_tr)
    assert roc_auc_score(y_te, model.predict_proba(x_te)[:, 1]) > 0.8


def test_thousand_sites_load_quickly():
    cfg = DataConfig(source="synthetic", synthetic_sites=1000, synthetic_samples=20000)
    start = time.perf_counter()
    data = load_federated(cfg)
    assert len(data.sites) == 1000 and data.sites[-1].name == "synthetic-site-999"
    assert time.perf_counter() - start < 5.0
