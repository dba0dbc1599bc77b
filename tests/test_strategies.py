"""Strategy construction from config, and NaN-aware weighted metric aggregation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from common.config import Config, ConfigError, FederationConfig, StrategyConfig
from server.strategies import STRATEGIES, build_strategy, weighted_metrics
from tests.flower_helpers import task_identity

EXPECTED_CLASS = {
    "fedavg": fl.FedAvg, "fedprox": fl.FedProx, "fedadam": fl.FedAdam, "fedyogi": fl.FedYogi,
    "fedadagrad": fl.FedAdagrad, "fedmedian": fl.FedMedian, "fedtrimmedavg": fl.FedTrimmedAvg,
    "krum": fl.Krum,
}


def test_the_eight_names_are_the_documented_ones() -> None:
    assert sorted(STRATEGIES) == sorted(EXPECTED_CLASS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASS))
def test_each_name_builds_its_flower_class(name) -> None:
    # exact class: Krum subclasses MultiKrum, FedProx/FedMedian/... subclass FedAvg
    assert type(build_strategy(StrategyConfig(name=name), 4)) is EXPECTED_CLASS[name]


def test_names_are_case_insensitive() -> None:
    assert type(build_strategy(StrategyConfig(name="FedAvg"), 4)) is fl.FedAvg


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASS))
def test_common_knobs_reach_every_strategy(name) -> None:
    cfg = StrategyConfig(name=name, fraction_train=0.5, fraction_evaluate=0.25, min_nodes=3)
    s = build_strategy(cfg, 10)
    assert (s.fraction_train, s.fraction_evaluate) == (0.5, 0.25)
    assert (s.min_train_nodes, s.min_evaluate_nodes, s.min_available_nodes) == (3, 3, 3)
    assert s.weighted_by_key == "num-examples"
    assert s.train_metrics_aggr_fn is weighted_metrics
    assert s.evaluate_metrics_aggr_fn is weighted_metrics


def test_min_evaluate_nodes_never_exceeds_the_number_of_nodes() -> None:
    assert build_strategy(StrategyConfig(min_nodes=5), 2).min_evaluate_nodes == 2


def test_fedprox_gets_proximal_mu() -> None:
    assert build_strategy(StrategyConfig(name="fedprox", proximal_mu=0.37), 4).proximal_mu == 0.37


def test_fedtrimmedavg_gets_beta() -> None:
    assert build_strategy(StrategyConfig(name="fedtrimmedavg", beta=0.3), 4).beta == 0.3


def test_krum_gets_num_malicious_nodes() -> None:
    s = build_strategy(StrategyConfig(name="krum", num_malicious_nodes=2), 8)
    assert (type(s), s.num_malicious_nodes) == (fl.Krum, 2)


def test_krum_with_nodes_to_select_is_multikrum() -> None:
    cfg = StrategyConfig(name="krum", num_malicious_nodes=1, num_nodes_to_select=3)
    s = build_strategy(cfg, 8)
    assert (type(s), s.num_malicious_nodes, s.num_nodes_to_select) == (fl.MultiKrum, 1, 3)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_strategies_get_their_server_optimiser_knobs(name) -> None:
    cfg = StrategyConfig(name=name, eta=0.2, eta_l=0.3, tau=0.004, beta_1=0.8, beta_2=0.95)
    s = build_strategy(cfg, 4)
    assert (s.eta, s.eta_l, s.tau, s.beta_1, s.beta_2) == (0.2, 0.3, 0.004, 0.8, 0.95)


def test_fedadagrad_gets_eta_and_tau() -> None:
    s = build_strategy(StrategyConfig(name="fedadagrad", eta=0.2, eta_l=0.3, tau=0.004), 4)
    assert (s.eta, s.eta_l, s.tau) == (0.2, 0.3, 0.004)


def test_unknown_name_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'federation\.strategy\.name'.*got 'fedsgd'"):
        build_strategy(StrategyConfig(name="fedsgd"), 4)


# --- weighted_metrics -----------------------------------------------------------------------
def _replies(*metrics: dict[str, float]) -> list[RecordDict]:
    return [RecordDict({"metrics": MetricRecord(m)}) for m in metrics]


def test_weighted_mean_by_num_examples() -> None:
    out = weighted_metrics(_replies(
        {"num-examples": 10, "accuracy": 0.5},
        {"num-examples": 30, "accuracy": 0.7},
        {"num-examples": 60, "accuracy": 0.9},
    ), "num-examples")
    assert out["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.7 + 60 * 0.9) / 100)  # 0.8
    assert out["num-examples"] == 100


def test_nan_is_skipped_and_its_weight_left_out() -> None:
    out = weighted_metrics(_replies(
        {"num-examples": 10, "auc": 0.6},
        {"num-examples": 30, "auc": math.nan},  # one-class test split
        {"num-examples": 60, "auc": 0.8},
    ), "num-examples")
    assert out["auc"] == pytest.approx((10 * 0.6 + 60 * 0.8) / 70)  # not / 100, not NaN
    assert out["num-examples"] == 100


def test_metric_undefined_everywhere_is_left_out() -> None:
    out = weighted_metrics(_replies({"num-examples": 4, "auc": math.nan, "loss": 1.0},
                                    {"num-examples": 6, "auc": math.nan, "loss": 2.0}),
                           "num-examples")
    assert "auc" not in out
    assert out["loss"] == pytest.approx((4 * 1.0 + 6 * 2.0) / 10)


def test_non_scalar_metrics_are_ignored() -> None:
    out = weighted_metrics(_replies({"num-examples": 4, "acc": 0.5, "hist": [1.0, 2.0]}),
                           "num-examples")
    assert dict(out) == {"acc": 0.5, "num-examples": 4}


# --- the benchmarks' in-process emulation aggregates as Flower does ---------------------------
def _train_reply(node: int, w: np.ndarray, n: int) -> Message:
    sent = Message(RecordDict(), dst_node_id=node, message_type="train")
    return Message(RecordDict({
        "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": n}),
    }), reply_to=sent)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadagrad", "fedadam", "fedyogi"])
def test_emulated_aggregation_is_flowers_to_the_bit(name: str) -> None:
    from benchmarks.emulate import Aggregator

    knobs = StrategyConfig(name=name, eta=0.05, tau=0.01, beta_1=0.8, beta_2=0.95)
    flower = build_strategy(knobs, 2)
    ours = Aggregator(Config(federation=FederationConfig(strategy=knobs)))
    rng = np.random.default_rng(0)
    current = rng.normal(size=3).astype(np.float32)
    with task_identity():
        _three_rounds(flower, ours, rng, current)


def _three_rounds(flower: fl.Strategy, ours: Any, rng: np.random.Generator,
                  current: np.ndarray) -> None:
    for server_round in (1, 2, 3):
        # replies are float32 (the hospitals' models); the global arrays may be float64
        updates = [((current + rng.normal(size=3)).astype(np.float32), n) for n in (10, 30, 7)]
        flower.current_arrays = {"w": current.copy()}  # what FedOpt.configure_train keeps
        arrays, _ = flower.aggregate_train(
            server_round, [_train_reply(i + 1, w, n) for i, (w, n) in enumerate(updates)])
        assert arrays is not None
        emulated = ours({"w": torch.from_numpy(current)},
                        [({"w": torch.from_numpy(w)}, n) for w, n in updates])["w"].numpy()
        # equal, not close: a difference of 1e-7 per round changes which version a long
        # run keeps (benchmarks/RESULTS.md section 2)
        assert emulated.dtype == arrays["w"].numpy().dtype
        np.testing.assert_array_equal(emulated, arrays["w"].numpy())
        current = arrays["w"].numpy()
