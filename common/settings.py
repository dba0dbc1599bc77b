"""Run settings shared by the server and client apps, read once from Flower's run config.

Run config (`[tool.flwr.app.config]`, `flwr run --run-config`, or the defaults `medfed simulate`
bakes into the apps) names the experiment YAML and its overrides, so both sides build the same
:class:`~common.config.Config`. Node config carries what differs per hospital.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import Config, ConfigError
from common.config_check import load_config
from common.signing import public_key_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def medfed_home() -> Path:
    """`$MEDFED_HOME`, default `~/.medfed`: keys, node caches, runs started by `flwr run`."""
    return Path(os.environ.get("MEDFED_HOME", Path.home() / ".medfed"))


def default_keys_path() -> Path:
    """Where the server's bundle-signing key lives unless `--keys` says otherwise."""
    return medfed_home() / "signing.key"


def resolve_path(text: str) -> Path:
    """An absolute path as is; a relative one against the working directory, then the app."""
    path = Path(text).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return PROJECT_ROOT / path


@dataclass(frozen=True)
class RunSettings:
    """What one federated run needs beyond the experiment config."""

    config_path: Path
    overrides: tuple[str, ...]
    run_dir: Path
    bundle: Path | None  # pretrained bundle; None: the server pretrains into run_dir first
    keys: Path  # the server's Ed25519 bundle-signing key
    resume: bool = False
    expected_nodes: int = 0  # hospitals expected (simulation: all; deployment: registered)

    def load_config(self) -> Config:
        """The experiment config both apps share (parsed once per file version)."""
        try:
            st = self.config_path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (-1, -1)  # load_config reports the missing file
        return _cached_config(str(self.config_path), self.overrides, stamp)

    def to_run_config(self) -> dict[str, str | bool | int]:
        """Flower run config form (strings only, so it survives `--run-config`)."""
        return {
            "config-path": str(self.config_path),
            "overrides": json.dumps(list(self.overrides)),
            "run-dir": str(self.run_dir),
            "bundle": str(self.bundle or ""),
            "keys": str(self.keys),
            "resume": self.resume,
            "expected-nodes": self.expected_nodes,
        }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Parse Flower's run config; missing keys take the defaults in pyproject.toml."""
        raw_overrides = str(run_config.get("overrides", "") or "")
        try:
            overrides = json.loads(raw_overrides) if raw_overrides.strip() else []
        except json.JSONDecodeError:
            # Also accept the plain form "a.b=1 c=2" typed on the command line.
            overrides = raw_overrides.split()
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError("run config 'overrides' must be a JSON list of 'key=value' strings")
        run_dir = str(run_config.get("run-dir", "") or "")
        config_path = resolve_path(str(run_config.get("config-path", "configs/heart.yaml")))
        bundle = str(run_config.get("bundle", "") or "")
        keys = str(run_config.get("keys", "") or "")
        return cls(
            config_path=config_path,
            overrides=tuple(overrides),
            run_dir=Path(run_dir) if run_dir else _default_run_dir(config_path),
            bundle=resolve_path(bundle) if bundle else None,
            keys=Path(keys) if keys else medfed_home() / "signing.key",
            resume=bool(run_config.get("resume", False)),
            expected_nodes=int(run_config.get("expected-nodes", 0) or 0),
        )


@functools.lru_cache(maxsize=8)
def _cached_config(path: str, overrides: tuple[str, ...], stamp: tuple[int, int]) -> Config:
    # One Flower worker handles many node messages; the YAML is parsed once per
    # (path, file version, overrides) instead of once per message.
    return load_config(path, overrides)


def _default_run_dir(config_path: Path) -> Path:
    return medfed_home() / "runs" / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class NodeSettings:
    """Per-hospital settings from Flower's node config (`--node-config`)."""

    site_name: str | None  # deployment: the hospital's name; simulation: from partition-id
    partition_id: int | None  # simulation only
    num_partitions: int  # simulation: number of simulated hospitals (0 in deployment)
    data_path: Path | None  # deployment: the hospital's CSV / npz
    # cache (backbones, features) and models of this node; None: a simulated node, which
    # lives in <run dir>/nodes/<its site name>/
    workdir: Path | None
    device: str | None
    signing_pub: Path | None  # the server's public key: verify what arrives
    test_path: Path | None = None  # deployment: the hospital's own test file, kept apart
    attack: str | None = None  # tests only: this hospital misbehaves (client/faults.py)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run: RunSettings | None
                         ) -> NodeSettings:
        """Parse the node config; simulation nodes live under the run directory."""
        pid = node_config.get("partition-id")
        site = str(node_config.get("site-name", "") or "") or None
        workdir = str(node_config.get("workdir", "") or "")
        if workdir:
            base: Path | None = Path(workdir)
        elif pid is not None:
            base = None
        else:
            base = medfed_home() / "nodes" / (site or "default")
        data = str(node_config.get("data-path", "") or "")
        test = str(node_config.get("test-path", "") or "")
        pub = str(node_config.get("signing-pub", "") or "")
        if not pub and pid is not None and run is not None:
            # a simulated hospital verifies with the key the simulated server signs with
            pub = str(public_key_path(run.keys))
        device = str(node_config.get("device", "") or "") or None
        return cls(
            site_name=site,
            partition_id=int(pid) if pid is not None else None,
            num_partitions=int(node_config.get("num-partitions", 0) or 0),
            data_path=Path(data) if data else None,
            workdir=base,
            device=device,
            signing_pub=Path(pub) if pub else None,
            test_path=Path(test) if test else None,
            attack=str(node_config.get("attack", "") or "") or None,
        )
