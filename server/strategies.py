"""Build the Flower strategy named in config, with NaN-aware metric aggregation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from common.config import ConfigError, StrategyConfig
from common.config_check import STRATEGY_NAMES
from common.records import NUM_EXAMPLES

COUNT_METRICS = ("n", "positives")
STRATEGIES = STRATEGY_NAMES  # one list: load_config rejects other names before a run starts


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each scalar metric over replies, skipping NaN (undefined) values.

    A site whose test split has one class reports AUC as NaN; it must not turn the mean into
    NaN, nor count as 0.5.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0.0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weight_key])  # type: ignore[arg-type]
        total += w
        for key, value in metrics.items():
            if key == weight_key or not isinstance(value, int | float):
                continue
            if math.isnan(float(value)):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(value)
            weights[key] = weights.get(key, 0.0) + w
    out: dict[str, Any] = {k: sums[k] / weights[k] for k in sums if weights[k] > 0}
    for key in COUNT_METRICS:  # counts add up over sites; a weighted mean of them means nothing
        counts = [_scalar(next(iter(r.metric_records.values())).get(key, math.nan))
                  for r in records]
        if counts and not any(math.isnan(c) for c in counts):
            out[key] = sum(counts)
    out[weight_key] = total
    return MetricRecord(out)


def _scalar(value: object) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def build_strategy(
    cfg: StrategyConfig, num_nodes_hint: int,
    metrics_fn: Callable[[list[RecordDict], str], MetricRecord] = weighted_metrics,
    site_evaluation: bool = True,
) -> Strategy:
    """The Flower strategy for `cfg.name`; knobs the strategy does not use are ignored.

    `site_evaluation` False: the strategy sends no evaluate messages (the sites score each
    global model in their next train reply instead: `federation.evaluate_with_train`).
    """
    strategy = _named_strategy(cfg, num_nodes_hint, metrics_fn)
    if not site_evaluation:
        # what Flower's own fraction_evaluate=0 does, without its warning that evaluation
        # is skipped (it is not: it travels with training)
        strategy.fraction_evaluate = 0.0  # type: ignore[attr-defined]
        strategy.min_evaluate_nodes = 0  # type: ignore[attr-defined]
    return strategy


def _named_strategy(
    cfg: StrategyConfig, num_nodes_hint: int,
    metrics_fn: Callable[[list[RecordDict], str], MetricRecord],
) -> Strategy:
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_nodes,
        "min_evaluate_nodes": min(cfg.min_nodes, max(1, num_nodes_hint)),
        "min_available_nodes": cfg.min_nodes,
        "weighted_by_key": NUM_EXAMPLES,
        "train_metrics_aggr_fn": metrics_fn,
        "evaluate_metrics_aggr_fn": metrics_fn,
    }
    opt: dict[str, Any] = {"eta": cfg.eta, "eta_l": cfg.eta_l, "tau": cfg.tau}
    name = cfg.name.lower()
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, **opt, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if name == "fedyogi":
        return FedYogi(**common, **opt, beta_1=cfg.beta_1, beta_2=cfg.beta_2)
    if name == "fedadagrad":
        return FedAdagrad(**common, **opt)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.beta)
    if name == "krum":
        if cfg.num_nodes_to_select > 0:
            return MultiKrum(
                **common, num_malicious_nodes=cfg.num_malicious_nodes,
                num_nodes_to_select=cfg.num_nodes_to_select,
            )
        return Krum(**common, num_malicious_nodes=cfg.num_malicious_nodes)
    raise ConfigError(
        f"config key 'federation.strategy.name' must be one of {', '.join(STRATEGIES)}, "
        f"got '{cfg.name}'"
    )
