"""Federated run with Flower's SecAgg+ secure aggregation: the server only learns the sum.

Why a separate path: in Flower 1.41 SecAgg+ exists only for the legacy workflow API
(`LegacyContext` + `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` on the server,
`secaggplus_mod` around a `NumPyClient` on the client); the message-based strategies used by
`server/federation.py` have no secure-aggregation workflow. This module keeps the whole
legacy path in one place and reuses everything else: `prepare` (config, key, bundle, data,
registry), backbone provisioning, `Federation.evaluate_round` (held-out check + signed
registry version per round, with per-site metrics), final delivery, site models and
`summary.json`. The hospital side is `client/secagg_client.py`.

What each round does: hospitals train exactly as on the normal path; each uploads
``num_examples * update`` quantised and masked; the server sums the masked vectors, removes
the masks with key shares from the other hospitals and divides by the summed weights, i.e.
FedAvg weighted by `num-examples`, up to quantisation error (about
``hospitals * 2 * secagg_clipping_range / secagg_quantization_range`` per parameter).

Not supported here: strategies other than FedAvg (a median, Krum or FedProx's client term
need individual updates or messages the legacy path does not carry); the update checks of
`server/validation.py` (the server never sees an individual update, so they cannot run);
differential privacy (`federation.privacy.dp` must be "off"); resending a round to a node
that lost its backbone mid-round (all nodes are provisioned before round 1). `num_examples`,
local losses and local test metrics still travel in clear, as on the normal path. The
security model is Flower's: an honest-but-curious server and at most
`secagg_reconstruction_threshold - 1` colluding hospitals per share group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.common import FitRes, NDArrays, Parameters, Scalar, ndarrays_to_parameters
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_evaluate_workflow
from flwr.serverapp import Grid

from common import records as rk
from common.config import ConfigError, PrivacyConfig
from common.config_check import check_privacy, sampled_per_round
from common.settings import RunSettings
from server.delegating_grid import DelegatingGrid
from server.federation import Federation, prepare, warn_if_warmup_spans_run
from server.provisioning import ProvisioningGrid, RunStopped

log = logging.getLogger("medfed.server")


class LegacyGrid(DelegatingGrid):
    """`fed.grid` for legacy messages: counts and audits replies, skips update validation.

    Only reply batches that carry our "metrics" record (the masked-vector stage of SecAgg+
    and evaluation) become `last_replies`, so `evaluate_round` finds the round's per-site
    training and test metrics instead of the key-exchange replies.
    """

    inner: ProvisioningGrid

    def __init__(self, inner: ProvisioningGrid) -> None:
        self.inner = inner


    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send through the provisioning grid's exchange (traffic, audit, site names)."""
        messages = list(messages)
        replies = self.inner._exchange(messages, timeout)  # noqa: SLF001 (validation skipped)
        if messages and any(rk.METRICS in r.content.metric_records
                            for r in replies if not r.has_error()):
            self.inner.last_replies[messages[0].metadata.message_type] = replies
        return replies


class SecAggFedAvg(FedAvg):
    """Legacy FedAvg that remembers which rounds were actually aggregated."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.aggregated: set[int] = set()

    def aggregate_fit(self, server_round: int,
                      results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """FedAvg of the (identical) unmasked aggregates SecAgg+ hands to every result."""
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.aggregated.add(server_round)
        return params, metrics


def _no_metrics(_: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    return {}  # per-site metrics are published by `evaluate_round`, not aggregated here


def _check(pc: PrivacyConfig, strategy_name: str, sampled: int) -> None:
    check_privacy(pc, strategy_name)
    # the one bound the config alone cannot give: the hospitals sampled in a round
    if not pc.secagg_num_shares <= sampled:
        raise ConfigError("config key 'federation.privacy.secagg_num_shares' must be in "
                          f"3..{sampled} (hospitals per round), got {pc.secagg_num_shares}")


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    """Node ids once at least `count` nodes are connected; RunStopped after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RunStopped(f"only {len(nodes)} of at least {count} nodes connected within "
                             f"{timeout:.0f} s")
        time.sleep(1.0)


def _arrays(fed: Federation, ndarrays: NDArrays) -> ArrayRecord:
    return ArrayRecord({n: torch.from_numpy(np.array(a, copy=True))
                        for n, a in zip(fed.trainable, ndarrays, strict=True)})


def run_secagg(grid: Grid, context: Context, settings: RunSettings) -> Federation:
    """The whole run with SecAgg+: provisioning, rounds, publication, delivery, summary."""
    fed = prepare(grid, settings)
    cfg = fed.cfg
    sc, pc = cfg.federation.strategy, cfg.federation.privacy
    nodes = wait_for_nodes(fed.grid, sc.min_nodes, sc.round_timeout)
    sampled = sampled_per_round(sc, len(nodes))
    _check(pc, sc.name, sampled)
    fed.grid.provision(nodes)
    state = fed.model.state_dict()
    initial = [state[n].detach().cpu().numpy() for n in fed.trainable]
    fed.evaluate_round(0, _arrays(fed, initial))

    sha, offset = fed.grid.payload.sha256, fed.round_offset
    strategy = SecAggFedAvg(
        fraction_fit=sc.fraction_train, fraction_evaluate=sc.fraction_evaluate,
        min_fit_clients=sc.min_nodes, min_evaluate_clients=min(sc.min_nodes, len(nodes)),
        min_available_clients=sc.min_nodes,
        on_fit_config_fn=lambda r: {rk.BACKBONE_SHA256: sha, rk.SERVER_ROUND: r + offset},
        on_evaluate_config_fn=lambda r: {rk.BACKBONE_SHA256: sha},
        initial_parameters=ndarrays_to_parameters(initial),
        fit_metrics_aggregation_fn=_no_metrics, evaluate_metrics_aggregation_fn=_no_metrics,
    )
    # weights are num_examples / max_weight: the largest hospital's rows keep them <= 1
    max_weight = float(max(fed.grid.bounded_declared().values(), default=1000))
    secagg = SecAggPlusWorkflow(
        num_shares=pc.secagg_num_shares,
        reconstruction_threshold=pc.secagg_reconstruction_threshold,
        max_weight=max_weight, clipping_range=pc.secagg_clipping_range,
        quantization_range=pc.secagg_quantization_range, timeout=sc.round_timeout,
    )

    def fit_round(legacy_grid: Grid, ctx: Context) -> None:
        secagg(legacy_grid, ctx)
        current = int(cast(int, ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        if current not in strategy.aggregated:  # Flower only logs "halted" and goes on
            raise RunStopped(f"round {current + offset}: secure aggregation did not complete "
                             "(see the Flower log above)")

    def evaluate_and_publish(legacy_grid: Grid, ctx: Context) -> None:
        default_evaluate_workflow(legacy_grid, ctx)  # per-site test metrics first
        current = int(cast(int, ctx.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]))
        params = ctx.state.array_records[MAIN_PARAMS_RECORD]
        fed.evaluate_round(current, _arrays(fed, list(params.to_numpy_ndarrays())))

    remaining = max(cfg.federation.rounds - offset, 0)
    warn_if_warmup_spans_run(cfg)
    log.info("federated run with SecAgg+: %s, %d rounds, %d shares, threshold %d, "
             "max weight %g", cfg.name, remaining, pc.secagg_num_shares,
             pc.secagg_reconstruction_threshold, max_weight)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=remaining,
                                                        round_timeout=sc.round_timeout),
                           strategy=strategy)
    DefaultWorkflow(fit_workflow=fit_round, evaluate_workflow=evaluate_and_publish)(
        LegacyGrid(fed.grid), legacy)

    fed.finish(extra={"secure_aggregation": {
        "protocol": "SecAgg+ (Flower legacy workflow)", "num_shares": pc.secagg_num_shares,
        "reconstruction_threshold": pc.secagg_reconstruction_threshold,
        "clipping_range": pc.secagg_clipping_range,
        "quantization_range": pc.secagg_quantization_range, "max_weight": max_weight,
    }})
    return fed

