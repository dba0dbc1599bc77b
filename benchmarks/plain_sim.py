"""Benchmark 3's yardstick: the bare loop's work as a plain Flower simulation, without medfed.

What `medfed simulate` costs over a bare loop is partly Flower's simulation runtime (a Ray
task per message, the in-memory state, the ServerApp's grid) and partly medfed's product
(backbone provisioning, reply checks, signed versions, events, site logs). This app runs
the same per-hospital work as the bare loop (`benchmarks/overhead.py::bare`) in Flower's
runtime with nothing of medfed's product: each node, per train message, scores the
received global model on its validation and test rows (as a `federation.evaluate_with_train`
node does), trains with `train_local` on the same inputs with the same seed, and replies
its tensors; the server is Flower's own `FedAvg` (`fraction_evaluate=0`: one message per
node per round) and writes one line per round (round 0 first) for the CPU marks.

The runtime is started as `medfed simulate` starts it (`server/simulate_worker.py`: Ray
started first, one CPU per node, the same `server/flower_speedups.py` engine fixes, the app
loaded by reference), so that `medfed simulate` / this = medfed's own share and this /
bare = the runtime's. Written for this benchmark on Flower 1.42's Message API.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from benchmarks import emulate
from common.config import Config
from common.models import SplitModel, load_state, set_trainable


@dataclass
class Work:
    """What every process of the run holds: the config, the starting model, the inputs."""

    cfg: Config
    model: SplitModel
    names: list[str]
    inputs: list[emulate.SiteInputs]


@functools.lru_cache(maxsize=2)
def work_for(request_json: str) -> Work:
    """Built once per process (driver and each actor), as the bare loop builds it once."""
    torch.set_num_threads(1)
    from common.config_check import load_config
    from common.data.federated import load_federated

    request = json.loads(request_json)
    cfg = load_config(Path(request["config"]), request["overrides"])
    home = Path(request["home"])
    model, norm = emulate.start_model(cfg, Path(request["bundle"]), home / "signing.key")
    data = load_federated(cfg.federation.data, norm, seed=cfg.seed)
    names = set_trainable(model, cfg.model.trainable)
    return Work(cfg, model, names,
                emulate.site_inputs(model, data.sites, cfg.model.trainable))


def make_client(request_json: str) -> ClientApp:
    """The node: score the received model, train, reply (the bare loop's work per hospital)."""
    from common.device import seed_everything
    from common.scoring import OperatingPoint, score_splits
    from common.training import train_local

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        work = work_for(request_json)
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        local = copy.deepcopy(work.model)
        load_state(local, msg.content.array_records["arrays"].to_torch_state_dict(),
                   where="plain Flower")
        inp = work.inputs[pid]
        score_splits(local, [(inp.site.x_val, inp.site.y_val),
                             (inp.site.x_test, inp.site.y_test)], OperatingPoint())
        seed = emulate.node_seed(work.cfg, pid, server_round)
        seed_everything(seed)
        res = train_local(local, inp.x_train, inp.site.y_train, work.cfg.federation.local,
                          work.cfg.model.trainable, torch.device("cpu"), seed,
                          features_cached=inp.cached)
        state = local.state_dict()
        return Message(RecordDict({
            "arrays": ArrayRecord({n: state[n].detach().clone() for n in work.names}),
            "metrics": MetricRecord({"num-examples": res.num_examples})}), reply_to=msg)

    return client


@functools.lru_cache(maxsize=2)
def _client_for(request_json: str) -> ClientApp:
    return make_client(request_json)


class Loader:
    """Pickled by reference with the request (as `client.client_app.ClientAppLoader`)."""

    def __init__(self, request_json: str) -> None:
        self.request_json = request_json

    def __call__(self) -> ClientApp:
        return _client_for(self.request_json)


def make_server(request_json: str) -> ServerApp:
    """Flower's FedAvg over every node, one line per round in the progress file."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        work = work_for(request_json)
        request = json.loads(request_json)
        progress = Path(request["progress"])
        start = time.perf_counter()
        replies = [0]  # valid train replies of the round being aggregated

        def count(records: list[RecordDict], key: str) -> MetricRecord:
            replies[0] = len(records)
            return MetricRecord({})

        def mark(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            with progress.open("a") as fh:  # read by benchmarks.util.PeakRss as lines grow
                fh.write(json.dumps({"round": server_round, "replies": replies[0],
                                     "elapsed_s": time.perf_counter() - start}) + "\n")
            replies[0] = 0
            return MetricRecord({"round": server_round})

        nodes = len(work.inputs)
        state = work.model.state_dict()
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes,
                          min_available_nodes=nodes, train_metrics_aggr_fn=count)
        strategy.start(grid=grid,
                       initial_arrays=ArrayRecord({n: state[n].clone() for n in work.names}),
                       num_rounds=work.cfg.federation.rounds, evaluate_fn=mark)

    return server


def run(request: dict[str, Any]) -> int:
    """One simulation (this process leads its group, as `server/simulate_worker.py`)."""
    from flwr.simulation import run_simulation

    from server import flower_speedups
    from server.simulate_worker import backend_config, ray_init_args, start_ray

    logging.getLogger("flwr").addFilter(lambda record: record.levelno >= logging.WARNING)
    request_json = json.dumps(request, sort_keys=True)
    nodes = len(work_for(request_json).inputs)
    flower_speedups.install(Loader(request_json))
    init_args = ray_init_args()
    why = start_ray(init_args, 300.0)
    if why is not None:
        print(f"plain Flower simulation: Ray did not start: {why}", file=sys.stderr)
        return 1
    run_simulation(server_app=make_server(request_json), client_app=make_client(request_json),
                   num_supernodes=nodes,
                   backend_config=backend_config(init_args, 1.0, 0.0))  # one CPU per node
    lines = [json.loads(line) for line in Path(request["progress"]).read_text().splitlines()]
    complete = [line for line in lines[1:] if line["replies"] == nodes]
    if len(complete) != work_for(request_json).cfg.federation.rounds:
        print(f"plain Flower simulation: {len(complete)} of {len(lines) - 1} rounds had a "
              f"reply from each of the {nodes} nodes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from benchmarks.plain_sim import run as run_here  # Loader pickles by this module's name

    sys.exit(run_here(json.loads(sys.argv[1])))
