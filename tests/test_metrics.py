"""Clinical metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from common import metrics
from common.metrics import (
    METRIC_NAMES,
    MULTICLASS_METRIC_NAMES,
    MetricError,
    average_ranks,
    bootstrap_intervals,
    compute_metrics,
)


def _binary(p1: list[float]) -> np.ndarray:
    p = np.asarray(p1)
    return np.column_stack([1 - p, p])


# predictions [1, 1, 0, 1, 1, 0, 0] -> TP 2, FN 1, FP 2, TN 2
Y = np.array([1, 1, 1, 0, 0, 0, 0])
P = _binary([0.9, 0.6, 0.2, 0.7, 0.8, 0.1, 0.3])

MULTI_Y = np.array([0, 1, 2, 1])
MULTI_P = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])


def test_binary_keys_in_display_order() -> None:
    assert tuple(compute_metrics(Y, P)) == METRIC_NAMES


def test_binary_confusion_matrix_metrics() -> None:
    got = compute_metrics(Y, P)
    assert got["accuracy"] == pytest.approx(4 / 7)
    assert got["precision"] == pytest.approx(2 / 4)
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["sensitivity"] == got["recall"]
    assert got["specificity"] == pytest.approx(2 / 4)
    assert got["f1"] == pytest.approx(4 / 7)  # 2PR/(P+R) = (2/3)/(7/6)
    assert (got["n"], got["positives"]) == (7, 3)


def test_binary_auc_counts_ordered_pairs() -> None:
    # positives 0.9 > 4 negatives, 0.6 > 2, 0.2 > 1, out of 3 * 4 pairs
    assert compute_metrics(Y, P)["auc"] == pytest.approx(7 / 12)


def test_binary_brier_is_mean_squared_error_of_p_positive() -> None:
    expected = (0.01 + 0.16 + 0.64 + 0.49 + 0.64 + 0.01 + 0.09) / 7
    assert compute_metrics(Y, P)["brier"] == pytest.approx(expected)


def test_binary_ece_by_hand() -> None:
    # bins: {0.15, 0.12} -> 1, 0.85 -> 8, 0.95 -> 9
    # 2/4*|0.5-0.135| + 1/4*|0-0.85| + 1/4*|1-0.95| = 0.1825 + 0.2125 + 0.0125
    got = compute_metrics(np.array([0, 1, 0, 1]), _binary([0.15, 0.12, 0.85, 0.95]))
    assert got["ece"] == pytest.approx(0.4075)


def test_one_class_split_has_undefined_auc_and_specificity() -> None:
    got = compute_metrics(np.ones(3, dtype=int), _binary([0.8, 0.4, 0.7]))
    assert got["auc"] is None
    assert got["specificity"] is None  # no negatives: undefined, never reported as 0 or 1
    assert got["recall"] == pytest.approx(2 / 3)
    assert got["balanced_accuracy"] == pytest.approx(2 / 3)  # mean recall of present classes


def test_no_predicted_positives_gives_undefined_precision() -> None:
    got = compute_metrics(np.array([0, 1]), _binary([0.2, 0.3]))
    assert got["precision"] is None and got["ppv"] is None
    assert got["f1"] == 0.0  # one positive missed: 2TP / (2TP + FP + FN) = 0
    assert got["npv"] == pytest.approx(1 / 2)


def test_balanced_accuracy_ppv_and_npv_by_hand() -> None:
    got = compute_metrics(Y, P)  # TP 2, FN 1, FP 2, TN 2
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 4) / 2)
    assert got["ppv"] == pytest.approx(2 / 4)
    assert got["npv"] == pytest.approx(2 / 3)


def test_threshold_moves_the_decisions() -> None:
    # at 0.65 only 0.9, 0.7 and 0.8 are positive: TP 1, FP 2, FN 2, TN 2
    got = compute_metrics(Y, P, threshold=0.65)
    assert got["sensitivity"] == pytest.approx(1 / 3)
    assert got["specificity"] == pytest.approx(2 / 4)
    assert got["auc"] == compute_metrics(Y, P)["auc"]  # a threshold does not change ranks


@pytest.mark.parametrize("seed", range(5))
def test_numpy_metrics_equal_scikit_learn_to_1e9(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    p1 = np.round(rng.random(200), 2)  # rounded: plenty of ties
    got = compute_metrics(y, _binary(list(p1)))
    pred = (p1 > 0.5).astype(int)
    assert got["auc"] == pytest.approx(roc_auc_score(y, p1), abs=1e-9)
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-9)
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-9)
    assert got["f1"] == pytest.approx(f1_score(y, pred), abs=1e-9)
    assert got["brier"] == pytest.approx(brier_score_loss(y, p1), abs=1e-9)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert got["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-9)
    assert got["npv"] == pytest.approx(tn / (tn + fn), abs=1e-9)


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=120)
    p = _binary(list(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 120), 0.01, 0.99)))
    first = bootstrap_intervals(y, p, samples=300, seed=7)
    assert first == bootstrap_intervals(y, p, samples=300, seed=7)
    assert first != bootstrap_intervals(y, p, samples=300, seed=8)
    point = compute_metrics(y, p)
    for key in ("auc", "balanced_accuracy", "sensitivity", "specificity"):
        lo, hi = first[key]
        assert lo <= point[key] <= hi and hi - lo < 0.5


def test_bootstrap_intervals_are_undefined_where_the_metric_is() -> None:
    y = np.ones(8, dtype=int)  # no negative in any resample
    p = _binary([0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.2])
    got = bootstrap_intervals(y, p, samples=200, seed=0)
    assert got["auc"] is None and got["specificity"] is None
    assert got["sensitivity"] is not None


def test_multiclass_metrics_by_hand() -> None:
    got = compute_metrics(MULTI_Y, MULTI_P)
    assert tuple(got) == MULTICLASS_METRIC_NAMES
    assert got["accuracy"] == pytest.approx(3 / 4)
    assert got["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert got["brier"] == pytest.approx((0.14 + 0.06 + 0.24 + 0.62) / 4)
    # top-label confidences 0.7, 0.8, 0.6, 0.5 each alone in a bin, last one wrong
    assert got["ece"] == pytest.approx((0.3 + 0.2 + 0.4 + 0.5) / 4)
    assert got["n"] == 4


def test_multiclass_auc_matches_sklearn_ovr_macro() -> None:
    y = np.array([0, 1, 2, 1, 0, 2])
    p = np.array(
        [
            [0.5, 0.3, 0.2],
            [0.3, 0.3, 0.4],
            [0.2, 0.5, 0.3],
            [0.1, 0.6, 0.3],
            [0.3, 0.4, 0.3],
            [0.6, 0.1, 0.3],
        ]
    )
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert compute_metrics(y, p)["auc"] == pytest.approx(expected)


def test_multiclass_auc_averages_only_present_classes() -> None:
    # class 0: 0.7 beats 0.1, 0.2, 0.5 -> 1; class 1: 0.8, 0.2 (tie), 0.4 vs 0.2 -> 2.5/3
    got = compute_metrics(np.array([0, 1, 1, 1]), MULTI_P)
    assert got["auc"] == pytest.approx((1 + 2.5 / 3) / 2)


def test_multiclass_single_class_has_undefined_auc() -> None:
    assert compute_metrics(np.array([2, 2, 2, 2]), MULTI_P)["auc"] is None


def test_empty_input_is_refused() -> None:
    with pytest.raises(MetricError, match="at least one example"):
        compute_metrics(np.array([], dtype=int), np.zeros((0, 2)))


def test_rows_not_summing_to_one_are_refused() -> None:
    with pytest.raises(MetricError, match="sum to 1"):
        compute_metrics(np.array([0, 1]), np.array([[0.5, 0.6], [0.2, 0.8]]))


def test_label_outside_classes_is_refused() -> None:
    with pytest.raises(MetricError, match=r"0\.\.1"):
        compute_metrics(np.array([0, 2]), P[:2])


def test_vectorised_bootstrap_draws_equal_the_per_resample_metrics() -> None:
    from common.metrics import _binary_draws

    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, size=40)
    p1 = np.round(rng.random(40), 1)  # ties
    idx = rng.integers(0, 40, size=(50, 40))
    draws = _binary_draws(y, p1, 0.5, idx)
    for row, i in enumerate(idx):
        expected = compute_metrics(y[i], _binary(list(p1[i])))
        for key, value in expected.items():
            if key in ("n", "positives"):
                continue
            got = draws[key][row]
            if value is None:
                assert np.isnan(got), key
            else:
                assert got == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("shape", [(1,), (7,), (40,), (5, 13), (200, 31)])
def test_average_ranks_equal_scipys_with_ties(shape: tuple[int, ...]) -> None:
    from scipy.stats import rankdata

    rng = np.random.default_rng(sum(shape))
    values = rng.integers(0, 4, size=shape).astype(np.float64) / 3  # many ties
    np.testing.assert_array_equal(average_ranks(values), rankdata(values, axis=-1))
    smooth = rng.normal(size=shape)  # no ties
    np.testing.assert_array_equal(average_ranks(smooth), rankdata(smooth, axis=-1))


@pytest.mark.parametrize("classes", [2, 3])
def test_bootstrap_in_blocks_gives_the_intervals_of_one_draw(monkeypatch, classes) -> None:
    """Resamples come a block at a time so a large file or many resamples stay in bounded
    memory; the intervals are those of drawing every resample at once."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, classes, size=90)
    p = rng.dirichlet(np.ones(classes), size=90)
    p[np.arange(90), y] += 0.5
    p /= p.sum(axis=1, keepdims=True)
    whole = bootstrap_intervals(y, p, samples=250, seed=3)  # one block: 250 x 90 cells
    monkeypatch.setattr(metrics, "BOOTSTRAP_BLOCK_CELLS", 90 * 7)  # blocks of 7 resamples
    assert bootstrap_intervals(y, p, samples=250, seed=3) == whole
