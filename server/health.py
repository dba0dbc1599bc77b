"""`medfed healthcheck`: is the medfed server up and ready for hospitals?

Ready means: the SuperLink answers Flower's gRPC health check (`--health-port`), and the
`medfed server` that wrote `<run-dir>/server.ready` after registering its hospitals is still
running. Container healthchecks use it so hospitals start only once they are registered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

READY_FILE = "server.ready"  # written by `medfed server` once its hospitals are registered
TIMEOUT_S = 5.0


def check_health(host: str, port: int, run_dir: Path) -> str | None:
    """None when healthy, else what is wrong (one sentence)."""
    ready = run_dir / READY_FILE
    try:
        pid = int(json.loads(ready.read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{ready} is missing or unreadable: the server has not registered its hospitals"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"the medfed server (pid {pid}) that wrote {ready} is not running"
    except PermissionError:
        pass  # alive, another user's
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    except grpc.RpcError as err:
        return f"the SuperLink's health check at {host}:{port} did not answer: {err.code().name}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"the SuperLink at {host}:{port} reports {reply.status}"
    return None
