"""`medfed server`: Flower SuperLink with TLS and node auth, hospital registration, the
federated run, and the model registry over mutual TLS.

Everything runs through Flower's own processes and CLI (`flower-superlink`,
`flwr supernode register`, `flwr run`) under a private FLWR_HOME in the run directory. Every
process started here is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from cryptography.hazmat.primitives import serialization

from common.bundle import load_bundle
from common.certs import (
    HOSPITAL_NAME,
    CertError,
    FederationPaths,
    check_server_certs,
    read_node_public_key,
)
from common.config import ConfigError, safe_yaml, show, yaml_problem
from common.config_check import check_hospital_count, load_config
from common.follow import TailReader
from common.names import printable
from common.processes import (
    ProcessGroup,
    bind_problem,
    flwr_env,
    interrupt_on_sigterm,
    kill_stale_groups,
    wait_for_port,
)
from common.settings import RunSettings
from common.signing import load_private_key, public_key_path
from server.health import READY_FILE
from server.heldout import preflight
from server.provisioning import Enrolment

log = logging.getLogger("medfed.server")
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
CONNECTION = "medfed"  # name of the SuperLink connection in the private FLWR_HOME
STARTUP_TIMEOUT_S = 60.0
CONSOLE_PATH = "/console"  # where the registry server mounts the console

if TYPE_CHECKING:
    from starlette.types import ASGIApp


@dataclass(frozen=True)
class Hospital:
    """A hospital admitted to the federation: its name, node public key (OpenSSH) and the
    most training rows its updates may weigh (None: the federation's configured bound)."""

    name: str
    public_key: Path
    max_examples: int | None = None


def load_hospitals(path: Path) -> list[Hospital]:
    """`hospitals.yaml`: a list of {name, public_key[, max_examples]}; relative keys are next
    to the file."""
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"), f"hospitals file {path}")
    except FileNotFoundError as err:
        raise ConfigError(f"hospitals file {path} does not exist") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"hospitals file {path} is not valid YAML: {yaml_problem(err)}") \
            from err
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if not isinstance(raw, list):
        raise ConfigError(f"hospitals file {path} must be a list of {{name, public_key}}")
    out = []
    names: set[str] = set()
    keys: dict[bytes, str] = {}  # each node key, to the hospital it belongs to
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not {"name", "public_key"} <= set(item) \
                or not set(item) <= {"name", "public_key", "max_examples"}:
            raise ConfigError(f"hospitals file {path}: entry {i} must have the keys 'name' and "
                              "'public_key' (and optionally 'max_examples')")
        name = str(item["name"])
        if not HOSPITAL_NAME.fullmatch(name):
            raise ConfigError(f"hospitals file {path}: entry {i} has name {show(name)}; use "
                              "lowercase letters, digits and '-' (as `medfed certs hospital`)")
        if name in names:
            raise ConfigError(f"hospitals file {path}: hospital '{name}' is listed twice")
        names.add(name)
        rows = item.get("max_examples")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int)
                                 or rows < 1):
            raise ConfigError(f"hospitals file {path}: 'max_examples' of '{name}' must be a "
                              f"positive integer, got {show(rows)}")
        key = Path(str(item["public_key"]))
        key = key if key.is_absolute() else path.parent / key
        if not key.exists():
            raise ConfigError(f"hospitals file {path}: public key {key} of "
                              f"'{name}' does not exist")
        # read now, before the SuperLink starts: a certificate or a directory given as the
        # key failed half-way through registering, leaving the others registered; the same
        # key under two names lets only one node join and the round wait for ever
        text = _node_key(key, name, path)
        if text in keys:
            raise ConfigError(f"hospitals file {path}: '{name}' has the same public key as "
                              f"'{keys[text]}'; each hospital needs its own node key")
        keys[text] = name
        out.append(Hospital(name, key, rows))
    return out


def _node_key(key: Path, name: str, path: Path) -> bytes:
    """The public key file of hospital `name`, checked (:func:`read_node_public_key`); its
    OpenSSH form, to find a key listed twice."""
    try:
        pub = read_node_public_key(key)
    except CertError as err:
        raise ConfigError(f"hospitals file {path}: public key of '{name}': {err}") from err
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


@dataclass(frozen=True)
class ServerRequest:
    """The `medfed server` command line, checked."""

    config: Path
    overrides: tuple[str, ...]
    bundle: Path
    certs: Path | None
    host: str
    port: int
    registry_port: int
    hospitals: Path | None
    run_dir: Path
    insecure: bool
    resume: bool
    exit_after_run: bool
    health_port: int = 0  # gRPC health of the SuperLink (container healthchecks); 0: none

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerRequest:
        """From the parsed `medfed server` arguments."""
        return cls(
            config=args.config, overrides=tuple(args.overrides), bundle=args.bundle,
            certs=args.certs, host=args.host, port=args.port, registry_port=args.registry_port,
            hospitals=args.hospitals, run_dir=args.run_dir.resolve(), insecure=args.insecure,
            resume=args.resume, exit_after_run=args.exit_after_run,
            health_port=args.health_port,
        )


def _write_connection(flwr_home: Path, port: int, certs: FederationPaths | None) -> None:
    """The flwr CLI's connection to our SuperLink (always via loopback on this host)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "127.0.0.1:{port}"']
    if certs is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{certs.ca_cert.resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _flwr(args: list[str], env: dict[str, str], timeout: float = 60.0
          ) -> subprocess.CompletedProcess[str]:
    flwr = str(Path(sys.executable).parent / "flwr")
    return subprocess.run([flwr, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout, check=False)


def _register(hospital: Hospital, env: dict[str, str]) -> int | None:
    """Register a hospital's node key; its node id (None when it was registered before)."""
    result = _flwr(["supernode", "register", str(hospital.public_key), CONNECTION,
                    "--name", hospital.name, "--format", "json"], env)
    text = (result.stdout + result.stderr).lower()
    if result.returncode == 0 and '"success": false' not in text:
        log.info("registered hospital %s", hospital.name)
        try:
            return int(json.loads(result.stdout)["node-id"])
        except (ValueError, KeyError, TypeError):
            return None
    if "already" in text or "exists" in text:
        log.info("hospital %s was already registered", hospital.name)
        return None
    detail = printable(result.stdout.strip() or result.stderr.strip())
    raise ConfigError(f"could not register hospital '{hospital.name}' "
                      f"({hospital.public_key}): {detail}")


def enrol(hospitals: list[Hospital], run_dir: Path, env: dict[str, str]) -> Enrolment:
    """Register every hospital and record who is who for the ServerApp (`enrolment.json`).

    A hospital's name is then the one registered for its node key, not what its node says.
    Node ids of hospitals registered by an earlier start are kept from the earlier record.
    """
    before = Enrolment.load(run_dir)
    names = dict(before.names)
    for hospital in hospitals:
        node = _register(hospital, env)
        if node is not None:
            names = {k: v for k, v in names.items() if v != hospital.name}
            names[node] = hospital.name
        elif hospital.name not in names.values():
            log.warning("hospital %s was registered before this run directory existed: its "
                        "node id is unknown here, so it is named by what its node reports",
                        hospital.name)
    enrolment = Enrolment(names, {h.name: h.max_examples for h in hospitals
                                  if h.max_examples is not None})
    enrolment.write(run_dir)
    return enrolment


APP_PYPROJECT = """\
# Written by `medfed server` for this run: the Flower app is the medfed package installed on
# the server and at each hospital; the FAB carries only this file (the run's settings).
[project]
name = "medfed"
version = "{version}"
description = "medfed federated run"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medfed"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "client.client_app:app"

[tool.flwr.app.config]
{config}
"""


def write_app_dir(req: ServerRequest, keys: Path, expected_nodes: int) -> Path:
    """The directory `flwr run` submits: a pyproject.toml naming the installed apps and this
    run's settings as the app config (so it works from a non-editable install, too)."""
    from importlib.metadata import PackageNotFoundError, version

    settings = RunSettings(config_path=req.config.resolve(), overrides=req.overrides,
                           run_dir=req.run_dir, bundle=req.bundle.resolve(), keys=keys,
                           resume=req.resume, expected_nodes=expected_nodes)
    try:
        medfed_version = version("medfed")
    except PackageNotFoundError:
        medfed_version = "0.0.0"
    # JSON scalars are valid TOML values (strings, integers, booleans)
    config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.to_run_config().items())
    app = req.run_dir / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(
        APP_PYPROJECT.format(version=medfed_version, config=config), encoding="utf-8")
    return app


def _ports_free(req: ServerRequest, certs: FederationPaths | None) -> None:
    """Refuse, before anything starts or is registered, when a port we need is taken."""
    wanted = [("--port", req.port)]
    if certs is not None:
        wanted.append(("--registry-port", req.registry_port))
    if req.health_port:
        wanted.append(("--health-port", req.health_port))
    for flag, port in wanted:
        problem = bind_problem(req.host, port)
        if problem == "is in use":
            raise ConfigError(f"port {port} on {req.host} ({flag}) is in use, perhaps by another "
                              "medfed server; stop it or choose another port")
        if problem is not None:
            raise ConfigError(f"port {port} on {show(req.host)} ({flag}) {problem}")


def _check(req: ServerRequest) -> tuple[FederationPaths | None, Path, list[Hospital]]:
    """Validate everything before any process starts; (certs, signing key, hospitals)."""
    cfg = load_config(req.config, req.overrides)
    hospitals = load_hospitals(req.hospitals) if req.hospitals else []
    if req.certs is None and not req.insecure:
        raise ConfigError("refusing to start without certificates: pass --certs DIR (made by "
                          "`medfed certs init`) or --insecure for a local test")
    certs = None if req.insecure else check_server_certs(req.certs)  # type: ignore[arg-type]
    if certs is not None:  # node authentication: only the enrolled hospitals can join
        if not req.hospitals:
            raise ConfigError("with --certs only the hospitals listed in --hospitals can join, "
                              "and no --hospitals file is given; pass one (a YAML list of "
                              "{name, public_key})")
        check_hospital_count(cfg, len(hospitals), f"{req.hospitals} enrols")
    _ports_free(req, certs)
    if certs is not None:
        keys = certs.signing_key
    else:
        from common.settings import medfed_home

        keys = (req.certs / "signing.key") if req.certs else medfed_home() / "signing.key"
    key = load_private_key(keys)
    load_bundle(req.bundle, key.public_key(), require_signature=True)
    preflight(cfg, req.bundle)
    if (req.run_dir / "checkpoint").exists() and not req.resume:
        raise FileExistsError(f"run directory {req.run_dir} holds a started run; continue it "
                              "with --resume or choose another --run-dir")
    return certs, keys, hospitals


def _superlink_cmd(req: ServerRequest, certs: FederationPaths | None) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", req.host,
           "--port", str(req.port), "--database", str(req.run_dir / "superlink.db"),
           "--disable-runtime-dependency-installation"]
    if req.health_port:
        cmd += ["--health-server-address", f"{req.host}:{req.health_port}"]
    if certs is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile",
            str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
            "--enable-supernode-auth"]


def run_server(req: ServerRequest,
               console: Callable[[Path, Path], ASGIApp] | None = None) -> int:
    """Start everything, run the federation, keep serving the registry until stopped.

    `console(run_dir, public_key)` builds the read-only console mounted at /console of the
    registry server (TLS only: behind the same client-certificate check)."""
    certs, keys, hospitals = _check(req)
    if certs is None:
        print("WARNING: medfed server is running INSECURE: no TLS, no hospital authentication. "
              "Use it only for a local test.", file=sys.stderr, flush=True)
    req.run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = req.run_dir / "flwr-home"
    env = flwr_env(flwr_home)
    _write_connection(flwr_home, req.port, certs)
    kill_stale_groups(req.run_dir / "processes.pid")  # left by a crashed `medfed server`
    group = ProcessGroup(req.run_dir / "processes.pid")
    registry = None
    ready = req.run_dir / READY_FILE
    ready.unlink(missing_ok=True)

    interrupt_on_sigterm()
    try:
        superlink = group.start(_superlink_cmd(req, certs), req.run_dir / "superlink.log", env)
        probe_host = "127.0.0.1" if req.host in ("0.0.0.0", "::") else req.host
        if not wait_for_port(probe_host, req.port, STARTUP_TIMEOUT_S, superlink):
            raise RuntimeError(f"flower-superlink did not start; see {req.run_dir}/superlink.log")
        log.info("SuperLink listening on %s:%d (%s)", req.host, req.port,
                 "INSECURE" if certs is None else "TLS, registered hospitals only")
        threading.Thread(target=_report_refused_joins,
                         args=(req.run_dir / "superlink.log", superlink), daemon=True).start()
        enrol(hospitals, req.run_dir, env)
        if certs is not None:
            from server.registry_http import start_registry_server

            mounts = {} if console is None else {
                CONSOLE_PATH: console(req.run_dir, public_key_path(keys))}
            registry = start_registry_server(
                req.run_dir / "registry", req.host, req.registry_port, certs.server_cert,
                certs.server_key, certs.ca_cert, mounts=mounts,
                enrolled=frozenset(h.name for h in hospitals))
            if console is not None:
                log.info("console on https://%s:%d%s/ (client certificates required)",
                         req.host, req.registry_port, CONSOLE_PATH)
            log.info("model registry on https://%s:%d (client certificates required)",
                     req.host, req.registry_port)
        ready.write_text(json.dumps({"pid": os.getpid(), "port": req.port,
                                     "hospitals": [h.name for h in hospitals]}) + "\n",
                         encoding="utf-8")
        code = _submit_and_stream(req, keys, env, group, len(hospitals))
        if code != 0 or req.exit_after_run:
            return code
        log.info("run finished; still serving the registry (Ctrl-C to stop)")
        while superlink.poll() is None:
            time.sleep(1.0)
        return 0
    except KeyboardInterrupt:
        log.info("stopping")
        return 0
    finally:
        ready.unlink(missing_ok=True)
        if registry is not None:
            registry.stop()
        group.stop_all()


REFUSED = re.compile(r"ApiError:(2004|2001)\]")
KEY_BODY = re.compile(r"BEGIN PUBLIC KEY-----(?:\\n|\s)*(.+?)(?:\\n|\s)*-----END")


def refused_join(line: str) -> str | None:
    """The operator's sentence for a SuperLink log line that refused a node, if it is one."""
    match = REFUSED.search(line)
    if match is None:
        return None
    if match.group(1) == "2001":
        return "refused a join: a node offered no node key (authentication is required)"
    key = KEY_BODY.search(line)
    if key is None:
        return "refused a join: a node key that is not registered"
    body = re.sub(r"\\n|\s", "", key.group(1))
    digest = hashlib.sha256(body.encode("ascii", errors="replace")).hexdigest()[:16]
    return (f"refused a join: a node key that is not registered (key fingerprint {digest}); "
            "add the hospital to --hospitals if it belongs to the federation")


def _report_refused_joins(log_file: Path, superlink: subprocess.Popen[bytes]) -> None:
    """Follow the SuperLink's log; name every refused join once per key in our log."""
    seen: set[str] = set()
    tail = TailReader(log_file)
    while superlink.poll() is None:
        for raw in tail.lines():
            sentence = refused_join(raw.decode(errors="replace"))
            if sentence is not None and sentence not in seen:
                seen.add(sentence)
                log.warning("%s", sentence)
        time.sleep(1.0)


def _submit_and_stream(req: ServerRequest, keys: Path, env: dict[str, str],
                       group: ProcessGroup, expected_nodes: int) -> int:
    """`flwr run` the app with our run config and stream its log; exit code of the run."""
    app = write_app_dir(req, keys, expected_nodes)
    flwr = str(Path(sys.executable).parent / "flwr")
    started = time.time()
    log_file = req.run_dir / "flwr-run.log"
    offset = log_file.stat().st_size if log_file.exists() else 0  # a resumed run appends
    submit = group.start([flwr, "run", str(app), CONNECTION, "--stream"], log_file, env)
    run_id = _follow(submit, log_file, offset)
    status = _run_status(env, run_id)
    log.info("federated run %s status: %s", run_id, status or "unknown")
    summary = req.run_dir / "summary.json"
    fresh = summary.exists() and summary.stat().st_mtime >= started
    return 0 if status.endswith("completed") and fresh else 1


def _follow(proc: subprocess.Popen[bytes], log_file: Path, offset: int) -> int | None:
    """Relay `flwr run --stream` output while it runs; returns the run id it announced."""
    run_id = None
    with log_file.open("rb") as fh:
        fh.seek(offset)
        while True:
            line = fh.readline()
            if not line:
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
                continue
            text = line.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            match = RUN_STARTED.search(text)
            if match and run_id is None:
                run_id = int(match.group(1))
    return run_id


def _run_status(env: dict[str, str], run_id: int | None) -> str:
    """Flower's status of run `run_id` (e.g. "finished:completed"), or "" if unknown."""
    if run_id is None:
        return ""
    result = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env)
    try:
        runs = json.loads(result.stdout).get("runs", [])
    except json.JSONDecodeError:
        return ""
    return str(runs[0].get("status", "")) if runs else ""
