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
import threading
from typing import Any

from common.config_check import load_config
from common.data.federated import raw_sites
from common.settings import RunSettings
from server.simulate import RUNTIME_DID_NOT_START, SimulateRequest


def start_ray(init_args: dict[str, Any], timeout_s: float) -> str | None:
    """Start Ray ourselves, bounded: None when up, else why not (one line).

    Flower's backend calls `ray.init` without a time limit and, when it fails, the ServerApp
    waits for nodes that never come. Started here first, Flower finds Ray initialised and
    uses it; arguments and PYTHONPATH as Flower's RayBackend would pass them. `ray.init` runs
    in the main thread: Ray's processes are tied to the thread that started them (they get
    SIGKILL when it ends), so only the clock runs in a helper thread; when time is up it says
    why and ends this process, and `medfed simulate` stops the rest of the group.
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    started = threading.Event()

    def clock() -> None:
        if not started.wait(timeout_s):
            _runtime_failed(timeout_s, "no answer from Ray's processes (the machine may be too "
                                       "busy; raise --runtime-start-timeout)")

    threading.Thread(target=clock, name="ray-start-clock", daemon=True).start()
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    except Exception as err:  # noqa: BLE001 - reported as one sentence
        started.set()
        first = (str(err).strip().splitlines() or [""])[0]
        return f"{type(err).__name__}: {first[:300]}"
    started.set()
    return None


def ray_init_args() -> dict[str, Any]:
    """How the simulation starts Ray: every core, no dashboard, warnings only."""
    return {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
            "logging_level": logging.WARNING, "log_to_driver": True}


def backend_config(init_args: dict[str, Any], cpus_per_client: float,
                   gpus_per_client: float) -> dict[str, Any]:
    """Flower's Ray backend config: the resources each simulated node's actor holds."""
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": init_args}


def _runtime_failed(timeout_s: float, why: str) -> None:
    print(f"medfed: error: the simulation runtime did not start within {timeout_s:g} s: {why}",
          file=sys.stderr, flush=True)
    os._exit(RUNTIME_DID_NOT_START)  # Ray's start-up may still block the main thread


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

    from client.client_app import ClientAppLoader, make_client_app
    from server import flower_speedups
    from server.server_app import make_server_app

    flower_speedups.install(ClientAppLoader(settings))

    init_args = ray_init_args()
    why = start_ray(init_args, request.runtime_start_timeout)
    if why is not None:
        _runtime_failed(request.runtime_start_timeout, why)
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(settings),
        num_supernodes=num_nodes,
        backend_config=backend_config(
            init_args, request.cpus_per_client, request.gpus_per_client or 0.0),
        verbose_logging=request.verbose,
    )
    return 0 if (settings.run_dir / "summary.json").exists() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
