"""Child process of `medfed simulate`: runs Flower's simulation runtime (Ray backend).

Started by :mod:`server.simulate` as the leader of its own process group; not a user command.
It calls `flwr.simulation.run_simulation` (deprecated in favour of `flwr run`, still supported
in 1.41/1.42): the apps run with our settings baked in, no SuperLink is left listening on a
fixed port, and everything ends with this process. `flwr run . local` runs the same apps.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from common.config_check import load_config
from common.data.federated import raw_sites
from common.settings import RunSettings
from server.simulate import SimulateRequest


def main(argv: list[str]) -> int:
    """Run the simulation described by the JSON request in argv[1]."""
    request = SimulateRequest.from_json(argv[1])
    # We lead our process group (Ray's processes included): on SIGTERM, e.g. because the
    # `medfed simulate` parent died, take the whole group down instead of orphaning Ray.
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("medfed").setLevel(logging.INFO)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower has its own console handler
    if not request.verbose:
        # a filter, not a level: Flower resets its logger's level when a run starts
        flwr_logger.addFilter(lambda record: record.levelno >= logging.WARNING)
    # `run_simulation` is the in-process entry point we use on purpose (see module doc)
    flwr_logger.addFilter(lambda record: "DEPRECATED FEATURE" not in record.getMessage())
    cfg = load_config(request.config_path.resolve(), request.overrides)
    num_nodes = len(raw_sites(cfg.federation.data, cfg.seed)[1])
    settings = RunSettings(
        config_path=request.config_path.resolve(), overrides=request.overrides,
        run_dir=request.run_dir.resolve(), bundle=request.bundle.resolve(),
        keys=request.keys.resolve(), resume=request.resume, expected_nodes=num_nodes,
    )

    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app

    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": request.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False,
                      "logging_level": logging.WARNING, "log_to_driver": True},
    }
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(settings),
        num_supernodes=num_nodes,
        backend_config=backend_config,  # type: ignore[arg-type]
        verbose_logging=request.verbose,
    )
    return 0 if (settings.run_dir / "summary.json").exists() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
