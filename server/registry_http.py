"""Read-only HTTPS access to the model registry, open only to holders of a federation certificate.

Endpoints (all ``GET``)::

    /health                          {"status": "ok"}
    /v1/versions                     {"versions": [0, 1, ...], "latest": N|null, "best": N|null}
    /v1/models/{spec}/manifest       manifest.json bytes of version ``spec`` (N | latest | best)
    /v1/models/{spec}/files/{name}   one bundle file (manifest.json, manifest.sig, *.safetensors)

Mutual TLS is enforced by the TLS layer itself (``CERT_REQUIRED`` with the federation CA as the
only trust root), so a client without a certificate signed by that CA never reaches the app.
Under ``medfed server`` a certificate must also name a hospital of its hospitals file (the
certificate's common name, as ``medfed certs hospital --name`` issues it): a hospital taken off
that file loses the registry and the console at the server's next start, though its
certificate is still valid; any other gets ``403`` with one sentence.
The server only serves bytes; clients verify hashes and the signature (``client/pull.py``)::

    from client.pull import pull_from_server
    pull_from_server("fl.example.org:8443", Path("certs/hospital-a"), "latest", Path("models/m"))

Errors are JSON ``{"detail": "<one sentence>"}`` and never reveal server file paths.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from common.bundle import (
    BACKBONE_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
)
from common.certs import CertError
from common.names import printable
from common.registry import Registry

SERVED_FILES = (MANIFEST_FILE, SIGNATURE_FILE, BACKBONE_FILE, HEAD_FILE)
_SPEC = re.compile(r"latest|best|[0-9]{1,9}")  # full matches only: "latest\n" is no spec
_START_TIMEOUT_S = 10.0
HANDSHAKE_TIMEOUT_S = 5.0  # an idle TLS handshake is dropped after this (asyncio default: 60)
MAX_CONNECTIONS = 64  # concurrent connections; more get HTTP 503
KEEP_ALIVE_S = 5
# a connection must send a whole request head within this of opening (or of its last
# response); uvicorn times a connection out only after a response, so 64 connections that
# sent nothing held every other hospital out with 503s
REQUEST_HEAD_S = 10.0


def _pointer_version(registry: Registry, name: str) -> int | None:
    try:
        pointer = registry.read_pointer(name)
    except (BundleError, ValueError) as err:  # ValueError: invalid JSON in the pointer file
        raise HTTPException(500, f"the registry's {name}.json pointer is malformed") from err
    return None if pointer is None else int(pointer["version"])


def _version_dir(registry: Registry, spec: str) -> Path:
    """Bundle directory for ``spec``; 404 with one sentence if there is no such version."""
    if not _SPEC.fullmatch(spec):
        raise HTTPException(
            404, f"no model version {spec!r}; expected a number, 'latest' or 'best'"
        )
    if spec in ("latest", "best"):
        version = _pointer_version(registry, spec)
        if version is None:
            raise HTTPException(404, f"the registry has no '{spec}' version yet")
    else:
        version = int(spec)
    if version not in registry.versions():
        raise HTTPException(404, f"the registry has no model version {version}")
    return registry.version_dir(version)


def create_app(registry_root: Path, mounts: Mapping[str, ASGIApp] | None = None) -> FastAPI:
    """Build the read-only registry app for the registry directory ``registry_root``;
    `mounts` adds apps under paths of the same server (the console: ``/console``), behind
    the same mutual TLS."""
    registry = Registry(Path(registry_root))  # no signing key: this process cannot publish
    app = FastAPI(title="medfed model registry", docs_url=None, redoc_url=None, openapi_url=None)
    for path, sub in (mounts or {}).items():
        app.mount(path, sub)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/versions")
    def versions() -> dict[str, object]:
        return {
            "versions": registry.versions(),
            "latest": _pointer_version(registry, "latest"),
            "best": _pointer_version(registry, "best"),
        }

    @app.get("/v1/models/{spec}/manifest")
    def manifest(spec: str) -> Response:
        return _file_response(registry.root, _version_dir(registry, spec), MANIFEST_FILE, spec)

    @app.get("/v1/models/{spec}/files/{name}")
    def bundle_file(spec: str, name: str) -> Response:
        # A fixed allow-list: nothing but the four bundle files can ever be named, so no
        # traversal or pointer/key file is reachable whatever the path decodes to.
        if name not in SERVED_FILES:
            raise HTTPException(
                404, f"no bundle file {name!r}; expected one of {', '.join(SERVED_FILES)}"
            )
        return _file_response(registry.root, _version_dir(registry, spec), name, spec)

    return app


def _inside(root: Path, path: Path) -> bool:
    """`path` is a plain file under `root`: no symlink on the way, nothing outside."""
    if path.is_symlink() or path.parent.is_symlink() or not path.is_file():
        return False
    return path.resolve().is_relative_to(root.resolve())


def _file_response(root: Path, bundle_dir: Path, name: str, spec: str) -> Response:
    path = bundle_dir / name
    if not _inside(root, path):  # replaced or deleted since the lookup, or a symlink
        raise HTTPException(404, f"model version {spec} has no file {name}")
    media = "application/json" if name == MANIFEST_FILE else "application/octet-stream"
    # The concrete version lets clients pin 'latest' before fetching the other files.
    return FileResponse(path, media_type=media, headers={"X-Medfed-Version": bundle_dir.name})


def _config(
    registry_root: Path,
    certfile: Path,
    keyfile: Path,
    ca_certfile: Path,
    log_level: str,
    mounts: Mapping[str, ASGIApp] | None = None,
    enrolled: frozenset[str] | None = None,
) -> uvicorn.Config:
    tls_files = (("certificate", certfile), ("key", keyfile), ("CA certificate", ca_certfile))
    for what, path in tls_files:
        if not Path(path).is_file():
            raise CertError(f"registry TLS {what} {path} does not exist")
    config = uvicorn.Config(
        create_app(registry_root, mounts),
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
        ssl_ca_certs=str(ca_certfile),
        ssl_cert_reqs=ssl.CERT_REQUIRED,  # mutual TLS: no federation client cert, no access
        log_level=log_level,
        server_header=False,
        loop="asyncio",  # _Server sets the handshake timeout on asyncio's create_server
        http=_HeadDeadline if enrolled is None else type(
            "_EnrolledOnly", (_HeadDeadline,), {"enrolled": enrolled}),
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    try:
        config.load()  # builds the SSL context now, so a bad certificate fails in the caller
    except ssl.SSLError as err:
        raise CertError(
            f"registry TLS files {certfile}, {keyfile}, {ca_certfile} are unusable: "
            f"{err.reason or err}"
        ) from err
    return config


class _HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head (:data:`REQUEST_HEAD_S`,
    from the connection or from its last response): an idle or dripping client is closed
    instead of holding one of the MAX_CONNECTIONS places."""

    _head_timer: asyncio.TimerHandle | None = None
    # the names a client certificate may carry (the hospitals file's); None: any the CA signed
    enrolled: frozenset[str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.enrolled is not None:
            name = _certificate_name(transport)
            if name not in self.enrolled:
                self.app = _not_enrolled(name)  # this connection's requests only
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(REQUEST_HEAD_S, self._head_overdue)

    def _head_overdue(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request arrived and is being answered (a large file may take long)
        if not self.transport.is_closing():
            self.transport.close()


def _certificate_name(transport: asyncio.BaseTransport) -> str | None:
    """The common name of the client certificate the TLS handshake verified."""
    cert = transport.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _not_enrolled(name: str | None) -> ASGIApp:
    """An app answering every request 403: the certificate names no enrolled hospital."""
    who = "names no hospital" if name is None else f"is for {printable(repr(name), 80)}"
    detail = (f"this client certificate {who}, which is not enrolled in this federation (the "
              "hospitals file of medfed server); ask its operator")
    return JSONResponse({"detail": detail}, status_code=403)


class _Server(uvicorn.Server):
    """uvicorn with a short TLS handshake timeout (it has no setting for it)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        create = loop.create_server
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            create, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        try:
            await super().startup(sockets)
        finally:
            loop.create_server = create  # type: ignore[method-assign]


def serve_registry(
    registry_root: Path,
    host: str,
    port: int,
    certfile: Path,
    keyfile: Path,
    ca_certfile: Path,
    log_level: str = "info",
) -> None:
    """Serve the registry over HTTPS with mutual TLS until interrupted (blocks)."""
    config = _config(registry_root, certfile, keyfile, ca_certfile, log_level)
    config.host, config.port = host, port
    _Server(config).run()


@dataclass
class RegistryServerHandle:
    """A registry server running in a background thread."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT`` as `pull --server` expects it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the server to exit and wait for it; force the exit if it lingers."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True  # drop open keep-alive connections
            self.thread.join(timeout)


def start_registry_server(
    registry_root: Path,
    host: str,
    port: int,
    certfile: Path,
    keyfile: Path,
    ca_certfile: Path,
    log_level: str = "warning",
    mounts: Mapping[str, ASGIApp] | None = None,
    enrolled: frozenset[str] | None = None,
) -> RegistryServerHandle:
    """Start the mutual-TLS registry server in a daemon thread and wait until it listens.

    ``port=0`` picks a free port; the handle's ``port`` is the one bound. ``enrolled``: the
    hospital names a client certificate must carry (None: any certificate the CA signed).

    Raises
    ------
    CertError
        If a certificate or key is missing or unusable.
    OSError
        If the address cannot be bound.
    RuntimeError
        If the server does not start within 10 s.
    """
    config = _config(registry_root, certfile, keyfile, ca_certfile, log_level, mounts,
                     enrolled)
    # Bind here (not in the thread) so bind errors reach the caller and port 0 is resolved.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    bound_port = int(sock.getsockname()[1])
    server = _Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="medfed-registry", daemon=True
    )
    thread.start()
    handle = RegistryServerHandle(server, thread, host, bound_port)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            handle.stop()
            sock.close()
            raise RuntimeError(f"the model registry server on {handle.address} did not start")
        time.sleep(0.02)
    return handle


def main(argv: list[str] | None = None) -> None:
    """``python -m server.registry_http --root DIR --host H --port P --cert C --key K --ca CA``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", type=Path, required=True, help="registry directory")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--cert", type=Path, required=True, help="server certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="server private key (PEM)")
    parser.add_argument("--ca", type=Path, required=True, help="federation CA certificate")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    serve_registry(args.root, args.host, args.port, args.cert, args.key, args.ca, args.log_level)


if __name__ == "__main__":
    main()
