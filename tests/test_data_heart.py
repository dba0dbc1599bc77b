"""Fed-Heart-Disease: FLamby protocol facts, the impute protocol, site normalisation."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split

from common.config import DataConfig
from common.data import DataError, Normaliser, SiteStats, heart, load_federated, load_source_split
from common.data.heart import (
    DATA_DIR,
    SITE_FILES,
    flamby_split,
    load_heart_sites,
    read_site,
)
from tests.conftest import PROJECT
from tests.limits import COMMAND_S

FLAMBY_SIZES = {
    "cleveland": (199, 104),
    "hungary": (172, 89),
    "switzerland": (30, 16),
    "va": (85, 45),
}


@pytest.fixture(scope="module")
def flamby_sites():
    return load_heart_sites("flamby")


def test_flamby_train_test_sizes_per_centre(flamby_sites):
    # our train + validation is FLamby's train split; the test split is FLamby's, untouched
    _, sites = flamby_sites
    assert {s.name: (len(s.y_train) + len(s.y_val), len(s.y_test))
            for s in sites} == FLAMBY_SIZES


def test_validation_is_a_stratified_fifth_of_flambys_train_split(flamby_sites):
    _, sites = flamby_sites
    for s in sites:
        n = len(s.y_train) + len(s.y_val)
        assert abs(len(s.y_val) - 0.2 * n) <= 2, s.name
        for c in (0, 1):  # each class keeps its share (Switzerland has no negative)
            both = int((s.y_train == c).sum() + (s.y_val == c).sum())
            assert abs(int((s.y_val == c).sum()) - 0.2 * both) <= 1, (s.name, c)


def test_flamby_has_13_features_in_get_dummies_order(flamby_sites):
    spec, sites = flamby_sites
    assert spec.input_shape == (13,)
    assert spec.feature_names == (
        "age",
        "sex",
        "trestbps",
        "chol",
        "fbs",
        "thalach",
        "exang",
        "oldpeak",
        "cp=2",
        "cp=3",
        "cp=4",
        "restecg=1",
        "restecg=2",
    )
    assert all(s.x_train.shape[1] == 13 and s.x_train.dtype == np.float32 for s in sites)


def test_flamby_switzerland_class_balance(flamby_sites):
    _, sites = flamby_sites
    swiss = next(s for s in sites if s.name == "switzerland")
    assert set(swiss.y_train) == set(swiss.y_val) == {1}  # FLamby's train split: 30/30 positive
    assert len(swiss.y_train) + len(swiss.y_val) == 30
    assert (int(swiss.y_test.sum()), len(swiss.y_test)) == (15, 16)


def _flamby_reference() -> dict[int, dict[str, np.ndarray]]:
    """FLamby's HeartDiseaseRaw steps, written out literally with pandas (the oracle)."""
    features, labels, centers, sets = [], [], [], []
    numbers = {"cleveland": 0, "hungarian": 1, "switzerland": 2, "va": 3}
    for path in sorted(Path(DATA_DIR).glob("*.data")):
        df = pd.read_csv(path, header=None)
        df = df.replace("?", np.nan).drop([10, 11, 12], axis=1).dropna(axis=0)
        df = df.apply(pd.to_numeric)
        cx, cy = df.iloc[:, :-1], df.iloc[:, -1]
        features.append(cx)
        labels.append(cy)
        centers += [numbers[path.name.split(".")[1]]] * len(cx)
        current = cy.where(cy == 0, 1)
        levels = np.unique(current)
        strat = (
            current if len(levels) > 1 and all((current == v).sum() > 2 for v in levels) else None
        )
        _, test = train_test_split(
            np.arange(len(cx)),
            test_size=1.0 - 0.66,
            train_size=0.66,
            random_state=43,
            shuffle=True,
            stratify=strat,
        )
        sets += ["test" if i in test else "train" for i in range(len(cx))]
    x = pd.get_dummies(pd.concat(features, ignore_index=True), columns=[2, 6], drop_first=True)
    x = x.to_numpy(dtype=np.float32)
    y = (pd.concat(labels, ignore_index=True).to_numpy() > 0).astype(np.int64)
    centers, sets = np.array(centers), np.array(sets)
    out = {}
    for c in range(4):
        tr, te = (centers == c) & (sets == "train"), (centers == c) & (sets == "test")
        out[c] = {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}
    return out


def _rows(x: np.ndarray, y: np.ndarray) -> list[tuple[float, ...]]:
    return sorted(tuple(map(float, r)) + (float(t),) for r, t in zip(x, y, strict=True))


def test_flamby_matches_reference_pipeline(flamby_sites):
    """Raw rows: our test split is FLamby's, in order; our train + validation is its train."""
    ref = _flamby_reference()
    _, sites = flamby_sites
    for c, site in enumerate(sites):
        np.testing.assert_allclose(site.x_test, ref[c]["x_test"], atol=1e-5)
        np.testing.assert_array_equal(site.y_test, ref[c]["y_test"])
        ours = _rows(np.concatenate([site.x_train, site.x_val]),
                     np.concatenate([site.y_train, site.y_val]))
        assert ours == _rows(ref[c]["x_train"], ref[c]["y_train"])


def test_site_normalisation_fits_on_train_only(flamby_sites):
    _, raw = flamby_sites
    data = load_federated(DataConfig())
    for r, s in zip(raw, data.sites, strict=True):
        mean, std = r.x_train.mean(0), r.x_train.std(0, ddof=1)
        std = np.where(std > 0, std, 1.0)
        np.testing.assert_allclose(s.x_test, (r.x_test - mean) / std, atol=1e-5)


def test_bundle_normalisation_needs_statistics():
    with pytest.raises(DataError, match="bundle"):
        load_federated(DataConfig(normalisation="bundle"))


def test_bundle_normalisation_applies_the_given_statistics(flamby_sites):
    _, raw = flamby_sites
    norm = SiteStats(Normaliser(mean=np.full(13, 2.0), std=np.full(13, 4.0)))
    data = load_federated(DataConfig(normalisation="bundle"), norm)
    np.testing.assert_allclose(data.sites[3].x_train, (raw[3].x_train - 2.0) / 4.0, rtol=1e-6)
    assert data.sites[3].stats is norm


def test_flamby_split_indices_are_disjoint_and_cover():
    y = (read_site("va").drop(columns=["slope", "ca", "thal"]).dropna()["num"] > 0).to_numpy()
    train, test = flamby_split(y, 43)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))


def test_recorded_splits_are_scikit_learns_for_every_shipped_file():
    vectors = heart.shipped_label_vectors()
    assert len(vectors) == 8  # two protocols, four sites
    for name, y in vectors.items():
        recorded = flamby_split(y, 43)
        assert heart._split_key(y, 43) in heart._known_splits(), name  # not computed here
        for ours, theirs in zip(recorded, heart._sklearn_split(y, 43), strict=True):
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
    # another seed, or data that is not shipped, is split by scikit-learn
    y = vectors["flamby/va"]
    for ours, theirs in zip(flamby_split(y, 44), heart._sklearn_split(y, 44), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert heart._split_key(y, 44) not in heart._known_splits()


def test_loading_the_shipped_heart_data_does_not_import_scikit_learn():
    # every simulated hospital and ServerApp loads it: scikit-learn costs about 1 s of CPU each
    code = ("import sys; from common.data.heart import load_heart_sites; "
            "[load_heart_sites(p) for p in ('flamby', 'impute')]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=COMMAND_S, cwd=PROJECT)
    assert out.stdout.strip() == "[]", out.stdout


def test_source_split_pools_raw_train_rows_without_the_validation_rows(flamby_sites):
    x, y, spec = load_source_split(DataConfig(sites=("cleveland", "va")), "train")
    _, sites = flamby_sites
    assert x.shape == (len(sites[0].y_train) + len(sites[3].y_train), 13)
    assert spec.kind == "tabular"
    assert x[:, 0].min() > 20  # age in years: not normalised
    xv, _, _ = load_source_split(DataConfig(sites=("cleveland", "va")), "validation")
    assert len(x) + len(xv) == 199 + 85


def test_unknown_site_lists_valid_names():
    with pytest.raises(DataError, match="cleveland, hungary, switzerland, va"):
        load_heart_sites("flamby", sites=("hungarian",))


def test_unknown_protocol_names_the_key():
    with pytest.raises(DataError, match="heart_protocol"):
        load_heart_sites("complete-case")


def test_impute_keeps_every_row_and_leaves_no_missing_value_once_preprocessed():
    spec, sites = load_heart_sites("impute")
    assert spec.input_shape == (18,)
    assert [sum(s.sizes().values()) for s in sites] == [303, 294, 123, 200]
    assert any(np.isnan(s.x_train).any() for s in sites)  # raw: missing stays missing
    data = load_federated(DataConfig(heart_protocol="impute"),
                          _impute_bundle_stats())
    assert not any(np.isnan(s.split(k)[0]).any() for s in data.sites
                   for k in ("train", "validation", "test"))


def _impute_bundle_stats() -> SiteStats:
    """What a bundle pretrained on Cleveland (impute protocol) carries."""
    spec, sites = load_heart_sites("impute", sites=("cleveland",))
    return SiteStats.fit(sites[0].x_train, spec.schema)


def test_impute_fills_with_the_median_of_the_sites_training_rows():
    spec, raw = load_heart_sites("impute", sites=("hungary",))
    chol = raw[0].x_train[:, 3]  # zeros are already missing (missing_values: [0])
    assert np.isnan(chol).any() and not (chol == 0).any()
    stats = SiteStats.fit(raw[0].x_train, spec.schema)
    assert stats.fill is not None and stats.fill[3] == np.nanmedian(chol)


def test_a_column_never_observed_at_a_site_falls_back_to_the_bundle():
    spec, raw = load_heart_sites("impute", sites=("switzerland",))
    assert np.isnan(raw[0].x_train[:, 3]).all()  # Switzerland never measured chol
    with pytest.raises(DataError, match="'chol' has no observed value"):
        SiteStats.fit(raw[0].x_train, spec.schema)
    bundle = _impute_bundle_stats()
    stats = SiteStats.fit(raw[0].x_train, spec.schema, fallback=bundle)
    assert stats.fill is not None and bundle.fill is not None
    assert stats.fill[3] == bundle.fill[3]


def _rewrite_column(path: Path, rows: np.ndarray, column: int, value: str) -> None:
    lines = path.read_text().splitlines()
    for r in rows:
        fields = lines[r].split(",")
        fields[column] = value
        lines[r] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


def test_impute_statistics_ignore_the_test_split(tmp_path):
    for name in SITE_FILES.values():
        shutil.copy(DATA_DIR / name, tmp_path / name)
    _, test_rows = flamby_split((read_site("hungary")["num"] > 0).to_numpy(), 43)
    _rewrite_column(tmp_path / SITE_FILES["hungary"], test_rows, 4, "600")  # chol of test rows
    spec, before = heart.load_heart_sites("impute", sites=("hungary",))
    _, after = heart.load_heart_sites("impute", sites=("hungary",), data_dir=tmp_path)
    np.testing.assert_array_equal(before[0].x_train, after[0].x_train)
    assert not np.array_equal(before[0].x_test, after[0].x_test, equal_nan=True)
    fitted = [SiteStats.fit(s[0].x_train, spec.schema).to_dict() for s in (before, after)]
    assert fitted[0] == fitted[1]  # changing test values changes no statistic


def test_non_natural_partition_keeps_each_split_apart():
    data = load_federated(DataConfig(partition="iid", num_sites=7), seed=1)
    assert [s.name for s in data.sites] == [f"site-0{i}" for i in range(7)]
    # train + validation rows: FLamby's train splits; test rows: FLamby's test splits
    assert sum(len(s.y_train) + len(s.y_val) for s in data.sites) == 199 + 172 + 30 + 85
    assert sum(len(s.y_test) for s in data.sites) == 104 + 89 + 16 + 45
    assert all(min(s.sizes().values()) > 0 for s in data.sites)
