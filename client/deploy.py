"""`medfed client`: the hospital's Flower SuperNode with its node key, the federation CA and
its node config (site name, data path, work directory, the server's signing key).

Flower's own messages for the usual failures are turned into one sentence each: server not
reachable, server certificate not trusted (wrong CA), node key not registered.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from common import records as rk
from common.certs import HospitalPaths, check_hospital_certs
from common.data.schema import DataError
from common.device import resolve_device
from common.processes import stop_group
from common.settings import medfed_home

log = logging.getLogger("medfed.client")

# Flower's log lines that mean the SuperNode will never get in, and what to tell the user.
FATAL_PATTERNS = (
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by the federation CA "
     "in {certs}/ca.crt (wrong CA or wrong server)"),
    ("certificate verify failed", "the server's certificate is not signed by the federation CA "
     "in {certs}/ca.crt (wrong CA or wrong server)"),
    ("code: 2004", "the server refused this hospital's node key: it is not registered (send "
     "{certs}/node_key.pub to the federation operator)"),
    ("code: 2001", "the server requires a registered node key and none was offered"),
    ("Failed to activate SuperNode", "the server refused this hospital's node key: it is not "
     "registered (send {certs}/node_key.pub to the federation operator)"),
)
UNREACHABLE = "cannot reach the server at {server}: connection refused or no route"


@dataclass(frozen=True)
class ClientRequest:
    """The `medfed client` command line, checked."""

    server: str
    data: Path
    test_data: Path | None
    certs: Path | None
    name: str
    device: str
    workdir: Path
    port: int
    insecure: bool
    max_retries: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientRequest:
        """From the parsed `medfed client` arguments."""
        return cls(
            server=args.server, data=args.data.resolve(),
            test_data=args.test_data.resolve() if args.test_data else None,
            certs=args.certs, name=args.name,
            device=args.device, workdir=(args.workdir or medfed_home() / args.name).resolve(),
            port=args.port, insecure=args.insecure, max_retries=args.max_retries,
        )


def signing_pub(certs: HospitalPaths | None) -> Path:
    """Where the hospital keeps the federation's public key (`signing.pub`)."""
    return certs.signing_pub if certs is not None else medfed_home() / "signing.pub"


def _node_config(req: ClientRequest, certs: HospitalPaths | None) -> str:
    values = {
        "site-name": req.name, "data-path": str(req.data), "workdir": str(req.workdir),
        "device": req.device, "signing-pub": str(signing_pub(certs).resolve()),
    }
    if req.test_data is not None:
        values["test-path"] = str(req.test_data)
    return " ".join(f'{k}="{v}"' for k, v in values.items())


def supernode_cmd(req: ClientRequest, certs: HospitalPaths | None) -> list[str]:
    """The `flower-supernode` command line for this hospital."""
    cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", req.server,
           "--node-config", _node_config(req, certs), "--port", str(req.port)]
    if req.max_retries > 0:
        cmd += ["--max-retries", str(req.max_retries)]
    if certs is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(certs.ca_cert),
            "--auth-supernode-private-key", str(certs.node_key)]


def _check(req: ClientRequest) -> HospitalPaths | None:
    if not req.data.exists():
        raise DataError(f"data file {req.data} does not exist")
    if req.test_data is not None and not req.test_data.exists():
        raise DataError(f"test data file {req.test_data} does not exist")
    if req.certs is None and not req.insecure:
        raise ValueError("refusing to start without certificates: pass --certs DIR (made by "
                         "`medfed certs hospital`) or --insecure for a local test")
    # the ClientApp would otherwise find an unknown or absent device only in round 1
    resolve_device(req.device)
    certs = None if req.insecure else check_hospital_certs(req.certs)  # type: ignore[arg-type]
    pub = signing_pub(certs)
    if not pub.exists():
        raise ValueError(f"refusing to start: the federation's public key {pub} is missing; "
                         "copy the server's signing.pub there (every backbone and model the "
                         "server sends is verified with it)")
    return certs


def _watch(proc: subprocess.Popen[str], req: ClientRequest, verdict: list[str]) -> None:
    """Relay the SuperNode's output; remember the first fatal condition seen."""
    assert proc.stdout is not None
    unreachable = 0
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        for pattern, message in FATAL_PATTERNS:
            if pattern in line and not verdict:
                verdict.append(message.format(certs=req.certs, server=req.server))
                proc.terminate()
        if "UNAVAILABLE" in line or "Connection refused" in line or "ConnectError" in line:
            unreachable += 1
    if not verdict and unreachable and proc.returncode not in (0, None):
        verdict.append(UNREACHABLE.format(server=req.server))


DATA_PREFIX = "its data does not match the model: "
EXIT_DATA = 2  # bad input, like `medfed check-data`


def _watch_refusal(proc: subprocess.Popen[str], refused: Path,
                   verdict: list[str]) -> None:
    """Stop the SuperNode when the ClientApp found this hospital's data unusable."""
    while proc.poll() is None:
        if refused.exists():
            try:
                reason = json.loads(refused.read_text(encoding="utf-8"))["reason"]
            except (OSError, ValueError, KeyError):
                reason = "see the SuperNode's log above"
            if not verdict:
                verdict.append(DATA_PREFIX + str(reason))
            proc.terminate()
            return
        time.sleep(0.5)


def run_client(req: ClientRequest) -> int:
    """Run the SuperNode until it stops (or Ctrl-C); one sentence on known failures."""
    certs = _check(req)
    if certs is None:
        print("WARNING: medfed client is running INSECURE: no TLS, no node authentication.",
              file=sys.stderr, flush=True)
    req.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
           "FLWR_HOME": str(req.workdir / "flwr-home"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(supernode_cmd(req, certs), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    verdict: list[str] = []
    refused = req.workdir / rk.DATA_REFUSED_FILE
    refused.unlink(missing_ok=True)  # a refusal of an earlier start is not this one's
    watcher = threading.Thread(target=_watch, args=(proc, req, verdict), daemon=True)
    watcher.start()
    threading.Thread(target=_watch_refusal, args=(proc, refused, verdict), daemon=True).start()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        code = proc.wait()
        watcher.join(timeout=5)
    except KeyboardInterrupt:
        code = 0
    finally:
        stop_group(proc)  # type: ignore[arg-type]
    if verdict:
        print(f"medfed: error: hospital {req.name}: {verdict[0]}", file=sys.stderr)
        return EXIT_DATA if verdict[0].startswith(DATA_PREFIX) else 3
    if code not in (0, -signal.SIGTERM):
        print(f"medfed: error: hospital {req.name}: flower-supernode exited with code {code}; "
              f"is the server at {req.server} running?", file=sys.stderr)
        return 3
    return 0
