"""The hospital side of secure aggregation: a legacy Flower NumPyClient behind `secaggplus_mod`.

Flower's SecAgg+ runs only on the legacy message API (`server/secagg.py` says why). Its
messages are ordinary "train"/"evaluate" messages without our "arrays" record (the legacy
records are "fitins.parameters", "fitins.config", "secaggplus", ...), so the decorator-based
ClientApp in `client/client_app.py` recognises them with :func:`is_legacy` and hands them to
the legacy ClientApp built here, with the same Context (SecAgg+ keeps its per-node protocol
state in `context.state`). Training and evaluation are the same `client/node.py` functions as
on the normal path. Legacy "get_parameters" messages are not served: the server always sends
initial parameters.

What leaves the hospital under SecAgg+: the update masked by pairwise and private masks, key
shares, `num_examples`, the local loss, and the local test metrics (those are not masked).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar

from client import node as ops
from common import records as rk

# Where the legacy compat layer puts a FitRes/EvaluateRes's metrics in a reply.
LEGACY_METRICS = ("fitres.metrics", "evaluateres.metrics")
LEGACY_COUNTS = ("fitres.num_examples", "evaluateres.num_examples")


def is_legacy(msg: Message) -> bool:
    """A message of the legacy workflow (SecAgg+ stages, legacy fit/evaluate)."""
    return rk.ARRAYS not in msg.content.array_records


class SecAggClient(NumPyClient):
    """`client/node.py` train/evaluate with lists of numpy arrays in trainable-name order."""

    def __init__(self, node: ops.Node) -> None:
        self.node = node

    def _named(self, parameters: NDArrays, config: dict[str, Scalar]
               ) -> tuple[dict[str, torch.Tensor], str]:
        sha = str(config[rk.BACKBONE_SHA256])
        _, _, names = self.node.model(sha)
        if len(parameters) != len(names):
            raise ValueError(f"legacy message carries {len(parameters)} arrays, the trainable "
                             f"set has {len(names)} tensors")
        return {n: torch.from_numpy(np.array(p)) for n, p in zip(names, parameters,
                                                                 strict=True)}, sha

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """The trainable tensors of the cached backbone's model (needs `backbone-sha256`)."""
        model, _, names = self.node.model(str(config[rk.BACKBONE_SHA256]))
        state = model.state_dict()
        return [state[n].detach().cpu().numpy() for n in names]

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]
            ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Local training, exactly as `client/node.py` `train` (no FedProx term)."""
        arrays, sha = self._named(parameters, config)
        tensors, result, site = ops.train(self.node, arrays, sha,
                                          int(config[rk.SERVER_ROUND]), 0.0)
        return ([t.numpy() for t in tensors.values()], result.num_examples,
                {"loss": result.loss, "steps": result.steps, rk.SITE: site})

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]
                 ) -> tuple[float, int, dict[str, Scalar]]:
        """Metrics of the global model on the local test split."""
        arrays, sha = self._named(parameters, config)
        metrics, n, site = ops.evaluate_local(self.node, arrays, sha)
        return float(metrics.get("loss", math.nan)), n, {**metrics, rk.SITE: site}


def make_legacy_app(node_for: Callable[[Context], ops.Node]) -> ClientApp:
    """The legacy ClientApp: `SecAggClient` wrapped in Flower's `secaggplus_mod`."""
    return ClientApp(client_fn=lambda context: SecAggClient(node_for(context)).to_client(),
                     mods=[secaggplus_mod])


def with_medfed_records(reply: Message) -> Message:
    """Add our "metrics"/"site" records to a legacy fit/evaluate reply.

    The server's provisioning grid learns site names, and `Federation.evaluate_round` reads
    per-site metrics, from these records on both paths. Only values the legacy reply carries
    in clear anyway are copied.
    """
    if reply.has_error():
        return reply
    content = reply.content
    legacy = next((content.config_records[k] for k in LEGACY_METRICS
                   if k in content.config_records), None)
    count = next((content.metric_records[k] for k in LEGACY_COUNTS
                  if k in content.metric_records), None)
    if legacy is None or count is None:
        return reply  # SecAgg+ key exchange / unmask stage
    numbers = {k: float(v) for k, v in legacy.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    content[rk.METRICS] = MetricRecord({**numbers, rk.NUM_EXAMPLES: count["num_examples"]})
    if isinstance(legacy.get(rk.SITE), str):
        content[rk.SITE] = ConfigRecord({rk.SITE_NAME: legacy[rk.SITE]})
    return reply


def handle_legacy(app: ClientApp, msg: Message, context: Context) -> Message:
    """Run a legacy message through `app` and label the reply for the medfed server."""
    return with_medfed_records(app(msg, context))
