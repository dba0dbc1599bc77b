"""`medfed simulate`: the same ServerApp and ClientApp on Flower's simulation runtime.

The simulation runs in a child process that leads its own process group; Ray and everything it
starts live in that group. Whatever happens in the parent (normal end, error, Ctrl-C), the
group is terminated before `simulate` returns, so no background process outlives the command.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from common.config_check import check_hospital_count, load_config
from common.data.federated import data_key_prefix, raw_sites
from common.data.splits import SiteSplit
from common.device import resolve_device
from common.names import sanitise_name
from common.processes import ProcessGroup, interrupt_on_sigterm, kill_stale_groups
from common.signing import load_or_create_signing_key, public_key_path
from server.heldout import preflight
from server.history import format_table
from server.provisioning import Enrolment

RUNTIME_DID_NOT_START = 4  # the worker's exit code when Ray did not start (it said why)
RUNTIME_START_TIMEOUT_S = 120.0
LISTED_SITES = 50  # sites listed with their split sizes at the start


@dataclass(frozen=True)
class SimulateRequest:
    """Everything the simulation child needs (JSON-serialisable)."""

    config_path: Path
    overrides: tuple[str, ...]
    bundle: Path
    run_dir: Path
    keys: Path
    resume: bool = False
    cpus_per_client: float = 1.0
    gpus_per_client: float | None = None  # None: 0 on CPU, an equal share of one GPU on CUDA
    verbose: bool = False
    runtime_start_timeout: float = RUNTIME_START_TIMEOUT_S

    def to_json(self) -> str:
        """Serialise for the child's command line."""
        return json.dumps({k: (str(v) if isinstance(v, Path) else v)
                           for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> SimulateRequest:
        """Parse the child's command line."""
        raw = json.loads(text)
        return cls(
            config_path=Path(raw["config_path"]), overrides=tuple(raw["overrides"]),
            bundle=Path(raw["bundle"]), run_dir=Path(raw["run_dir"]), keys=Path(raw["keys"]),
            resume=bool(raw["resume"]), cpus_per_client=float(raw["cpus_per_client"]),
            gpus_per_client=(None if raw.get("gpus_per_client") is None
                             else float(raw["gpus_per_client"])),
            verbose=bool(raw["verbose"]),
            runtime_start_timeout=float(raw["runtime_start_timeout"]),
        )


def gpu_share(device: torch.device, requested: float | None, cpus_per_client: float,
              cpus: int) -> float:
    """The share of one GPU Flower's backend reserves per simulated ClientApp.

    As requested, else 0 off CUDA and, on CUDA, an equal share for each ClientApp the CPUs
    let run at once (Ray then packs them on the GPU instead of running one at a time).
    """
    if requested is not None:
        if device.type == "cuda" and requested == 0:
            raise ValueError("--gpus-per-client 0 with device cuda: Ray would not schedule the "
                             "simulated hospitals on the GPU; give a share above 0 or omit it")
        return requested
    if device.type != "cuda":
        return 0.0
    at_once = max(1, int(cpus // max(cpus_per_client, 1e-9)))
    return 1.0 / at_once


def enrol_simulated(run_dir: Path, sites: tuple[SiteSplit, ...]) -> None:
    """The simulated hospitals' enrolment: the data says how many training rows each holds
    (what an operator writes in hospitals.yaml for a deployment)."""
    Enrolment(max_examples={sanitise_name(s.name): len(s.y_train) for s in sites}).write(run_dir)


def simulate(request: SimulateRequest) -> int:
    """Run the simulation child, relay its progress, print the final table."""
    cfg = load_config(request.config_path, request.overrides)  # fail fast on a bad config
    # ... and on bad hospital data or a bad heldout file, before anything is written
    with data_key_prefix("federation.data"):
        _, sites = raw_sites(cfg.federation.data, cfg.seed)
    check_hospital_count(cfg, len(sites), "the simulation has")
    preflight(cfg, request.bundle)
    cores = os.cpu_count() or 1  # what simulate_worker gives Ray
    if not 0 < request.cpus_per_client <= cores:
        # Ray would wait for ever for an actor it can never place
        raise ValueError(f"--cpus-per-client must be above 0 and at most the {cores} CPU "
                         f"cores of this machine, got {request.cpus_per_client:g}")
    # a GPU that is asked for but missing stops here, not in every hospital's first round
    device = resolve_device(cfg.device)
    request = replace(request, gpus_per_client=gpu_share(
        device, request.gpus_per_client, request.cpus_per_client, cores))
    if request.run_dir.exists() and not request.run_dir.is_dir():
        raise FileExistsError(f"--out {request.run_dir} is a file; give a directory for the run")
    if (request.run_dir / "summary.json").exists():
        raise FileExistsError(f"run directory {request.run_dir} already holds a finished run; "
                              "choose another --out")
    if (request.run_dir / "metrics.jsonl").exists() and not request.resume:
        raise FileExistsError(f"run directory {request.run_dir} holds an unfinished run; "
                              "continue it with --resume or choose another --out")
    _, created = load_or_create_signing_key(request.keys)
    if created:
        print(f"created bundle-signing key {request.keys} (public key: "
              f"{public_key_path(request.keys)})")
    kill_stale_groups(request.run_dir / "processes.pid")  # left by a crashed simulation
    request.run_dir.mkdir(parents=True, exist_ok=True)
    enrol_simulated(request.run_dir, sites)
    (request.run_dir / "request.json").write_text(request.to_json() + "\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "server.simulate_worker", request.to_json()]
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
           "PYTHONUNBUFFERED": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    print(f"simulating {cfg.name}: {len(sites)} hospitals, {cfg.federation.rounds} rounds, "
          f"run directory {request.run_dir}", flush=True)
    for site in sites[:LISTED_SITES]:
        sizes = site.sizes()
        print(f"  {site.name}: {sizes['train']} train, {sizes['validation']} validation, "
              f"{sizes['test']} test rows", flush=True)
    if len(sites) > LISTED_SITES:
        print(f"  ... and {len(sites) - LISTED_SITES} more (every site's rows: "
              f"{request.run_dir / 'splits.json'})", flush=True)
    group = ProcessGroup(request.run_dir / "processes.pid")
    interrupt_on_sigterm()
    try:
        code = group.start(cmd, env=env).wait()
    finally:
        group.stop_all()
    summary_path = request.run_dir / "summary.json"
    if code == RUNTIME_DID_NOT_START:
        return code  # the worker printed the sentence; its processes are stopped
    if code != 0 or not summary_path.exists():
        print(f"medfed: error: simulation failed (exit code {code}); see the log above",
              file=sys.stderr)
        return code or 1
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    print()
    print(format_table(summary))
    print()
    if summary.get("privacy"):
        from server.privacy import format_report  # imports Flower: only when needed

        print(format_report(summary["privacy"]))
    best = summary.get("best") or {}
    print(f"registry: {request.run_dir / 'registry'} (latest v{summary['latest']['version']:04d}, "
          f"best v{best.get('version', 0):04d} by validation {summary['best_metric']}; "
          f"delivered v{summary['final'].get('version', 0):04d})")
    print(f"site models: {request.run_dir / 'nodes'}/<site>/personalised (signed, with the "
          "site's statistics)")
    print(f"metrics:  {request.run_dir / 'metrics.jsonl'}, {request.run_dir / 'metrics.csv'}, "
          f"{request.run_dir / 'splits.json'}")
    print(f"plots:    {request.run_dir / 'metrics.png'}, {request.run_dir / 'loss.png'}")
    return 0
