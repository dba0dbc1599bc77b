"""Download a global model version and verify it before it appears on disk.

Two sources: a registry directory (``pull_from_registry``) or the server's HTTPS registry with
mutual TLS (``pull_from_server``, see ``server/registry_http.py``). Either way the bundle is
built in a temporary directory next to ``out``, its hashes (and signature) are checked, and only
then is it renamed to ``out``; on any failure nothing is written to ``out``.

Errors: transport and usage problems raise :class:`PullError`; a bundle that fails verification
raises :class:`~common.bundle.BundleError` (:class:`~common.bundle.BundleSignatureError` for a
bad signature), each naming the file.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.atomic import atomic_dir
from common.bundle import (
    BACKBONE_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    copy_bundle,
    load_bundle,
)
from common.certs import HospitalPaths
from common.signing import load_public_key
from server.registry import Registry

DEFAULT_PORT = 8443  # `medfed server --registry-port` default
DEFAULT_TIMEOUT_S = 30.0  # per socket operation, not per download
MAX_FILE_BYTES = 8 << 30  # refuse absurd downloads rather than fill the disk
_CHUNK = 1 << 20
BUNDLE_FILES = (MANIFEST_FILE, SIGNATURE_FILE, BACKBONE_FILE, HEAD_FILE)
# TLS alerts a server sends when it rejects (or never got) our client certificate.
_CLIENT_CERT_ALERTS = (
    "CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED", "CERTIFICATE_REVOKED", "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED",
)


class PullError(ValueError):
    """A model could not be pulled (bad arguments, unreachable or refusing registry, 404)."""


# ---------------------------------------------------------------------------- shared checks


def _check_spec(version: str) -> str:
    spec = str(version).strip()
    if spec not in ("latest", "best") and not spec.isdigit():
        raise PullError(f"--version must be a number, 'latest' or 'best'; got {version!r}")
    return spec


def _check_out(out: Path, replace: bool) -> None:
    if out.exists() and not replace:
        raise PullError(
            f"output directory {out} already exists; choose a new --out or remove it first"
        )


def _load_key(public_key: Path | None) -> Ed25519PublicKey | None:
    return None if public_key is None else load_public_key(Path(public_key))


# ---------------------------------------------------------------------------- from a directory


def pull_from_registry(
    registry: Path,
    version: str,
    out: Path,
    public_key: Path | None = None,
    *,
    replace: bool = False,
) -> dict[str, Any]:
    """Copy version ``version`` (N | latest | best) of a registry directory to ``out``.

    Hashes are always checked; the signature too when ``public_key`` is given (the caller
    decides whether an unsigned check is acceptable).

    Returns
    -------
    dict[str, Any]
        The verified manifest.

    Raises
    ------
    PullError
        If the registry directory is missing, ``version`` is malformed or ``out`` exists.
    BundleError, BundleSignatureError
        If the version does not exist or fails verification; ``out`` is untouched.
    """
    registry, out = Path(registry), Path(out)
    spec = _check_spec(version)
    if not registry.is_dir():
        raise PullError(f"registry directory {registry} does not exist")
    _check_out(out, replace)
    pub = _load_key(public_key)
    src = Registry(registry).resolve(spec)
    return copy_bundle(src, out, pub, replace=replace)


# ---------------------------------------------------------------------------- from the server


def parse_address(server: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT``; the port defaults to 8443)."""
    text = server.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
        if not sep or (rest and not rest.startswith(":")):
            raise PullError(f"--server {server!r} is malformed; expected HOST:PORT or [IPv6]:PORT")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host or (":" in host and not text.startswith("[")):
        raise PullError(f"--server {server!r} is malformed; expected HOST:PORT or [IPv6]:PORT")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise PullError(f"--server {server!r} has port {port_text!r}; expected 1-65535")
    return host, int(port_text)


def _tls_context(certs: Path | None) -> tuple[ssl.SSLContext, HospitalPaths]:
    """Client context: our certificate, and the federation CA as the only trust root."""
    if certs is None:
        raise PullError(
            "--certs is required with --server; expected the hospital folder with client.pem, "
            "client.key and ca.crt (from `medfed certs hospital`)"
        )
    paths = HospitalPaths(Path(certs))
    for what, path in (
        ("client certificate", paths.client_cert),
        ("client key", paths.client_key),
        ("federation CA certificate", paths.ca_cert),
    ):
        if not path.is_file():
            raise PullError(f"{what} {path} is missing (create it with `medfed certs hospital`)")
    try:
        # cafile given => the system trust store is NOT loaded: only the federation CA counts.
        context = ssl.create_default_context(cafile=str(paths.ca_cert))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(paths.client_cert), str(paths.client_key))
    except ssl.SSLError as err:
        raise PullError(
            f"cannot use {paths.client_cert}, {paths.client_key} and {paths.ca_cert} for TLS: "
            f"{err.reason or err} (is the key the certificate's, both PEM?)"
        ) from err
    return context, paths


def _transport_error(err: OSError, address: str, paths: HospitalPaths, timeout: float) -> PullError:
    """One sentence for a failed connection or TLS handshake."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return PullError(
            f"the model registry at {address} presented a certificate not trusted by the "
            f"federation CA {paths.ca_cert} ({err.verify_message})"
        )
    if isinstance(err, ssl.SSLError):
        reason = str(err.reason or err)
        if any(alert in reason.upper() for alert in _CLIENT_CERT_ALERTS):
            return PullError(
                f"the model registry at {address} refused our client certificate "
                f"{paths.client_cert} (TLS alert {reason}); expected one signed by the "
                "federation CA"
            )
        return PullError(f"TLS handshake with the model registry at {address} failed ({reason})")
    if isinstance(err, ConnectionRefusedError):
        return PullError(f"cannot reach the model registry at {address} (connection refused)")
    if isinstance(err, TimeoutError):
        return PullError(f"cannot reach the model registry at {address} (no answer in {timeout} s)")
    if isinstance(err, socket.gaierror):
        return PullError(f"cannot reach the model registry at {address} (unknown host name)")
    if isinstance(err, ConnectionResetError | BrokenPipeError):
        return PullError(
            f"the model registry at {address} closed the connection during the TLS handshake; "
            f"it accepts only client certificates signed by the federation CA (ours: "
            f"{paths.client_cert})"
        )
    return PullError(f"cannot reach the model registry at {address} ({err.strerror or err})")


class _RegistryClient:
    """One keep-alive HTTPS connection to the registry; every failure becomes a PullError."""

    def __init__(self, server: str, certs: Path | None, timeout: float) -> None:
        host, port = parse_address(server)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.timeout = timeout
        context, self.paths = _tls_context(certs)
        self.conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def get(self, path: str, sink: Path | None = None) -> bytes:
        """GET ``path``; return the body, or stream it into ``sink`` (returns b'')."""
        try:
            self.conn.request("GET", path)
            response = self.conn.getresponse()
            if response.status != 200:
                raise self._status_error(path, response)
            if sink is None:
                return response.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]
            self._stream(response, path, sink)
            return b""
        except http.client.RemoteDisconnected as err:
            raise _transport_error(
                ConnectionResetError(str(err)), self.address, self.paths, self.timeout
            ) from err
        except OSError as err:
            raise _transport_error(err, self.address, self.paths, self.timeout) from err
        except http.client.HTTPException as err:
            raise PullError(
                f"the model registry at {self.address} sent a malformed answer to {path} ({err!r})"
            ) from err

    def _stream(self, response: http.client.HTTPResponse, path: str, sink: Path) -> None:
        written = 0
        with open(sink, "wb") as handle:
            while chunk := response.read(_CHUNK):
                written += len(chunk)
                if written > MAX_FILE_BYTES:
                    raise PullError(
                        f"{path} from {self.address} exceeds {MAX_FILE_BYTES >> 30} GiB; refused"
                    )
                handle.write(chunk)

    def _status_error(self, path: str, response: http.client.HTTPResponse) -> PullError:
        body = response.read(64 * 1024)
        try:
            detail = str(json.loads(body)["detail"])
        except (ValueError, KeyError, TypeError):
            detail = f"HTTP {response.status} {response.reason}"
        if response.status == 404:
            return PullError(f"the model registry at {self.address}: {detail}")
        return PullError(
            f"the model registry at {self.address} answered HTTP {response.status} for {path} "
            f"({detail})"
        )

    def resolve(self, spec: str) -> int:
        """Pin ``latest``/``best`` to a number once, so all files come from one version."""
        if spec.isdigit():
            return int(spec)
        body = self.get("/v1/versions")  # PullError is a ValueError: keep it out of the try
        try:
            version = json.loads(body)[spec]
        except (ValueError, KeyError, TypeError) as err:
            raise PullError(
                f"the model registry at {self.address} sent a malformed /v1/versions answer"
            ) from err
        if version is None:
            raise PullError(f"the model registry at {self.address} has no '{spec}' version yet")
        if not isinstance(version, int):
            raise PullError(
                f"the model registry at {self.address} gave {spec}={version!r}; expected a number"
            )
        return version


def _default_public_key(certs: Path | None, public_key: Path | None) -> Path:
    if public_key is not None:
        return Path(public_key)
    if certs is None:
        raise PullError("--certs is required with --server")
    default = HospitalPaths(Path(certs)).signing_pub
    if not default.is_file():
        raise PullError(
            f"bundle signing key {default} is missing; copy the server's signing.pub there "
            "or pass --public-key"
        )
    return default


def pull_from_server(
    server: str,
    certs: Path | None,
    version: str,
    out: Path,
    public_key: Path | None = None,
    *,
    replace: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Download version ``version`` from the HTTPS model registry at ``server`` into ``out``.

    Parameters
    ----------
    server:
        ``HOST:PORT`` of the registry (port 8443 if omitted).
    certs:
        The hospital folder: ``client.pem``/``client.key`` identify us, ``ca.crt`` is the only
        trusted root, ``signing.pub`` verifies the bundle unless ``public_key`` is given.
    version:
        ``N``, ``latest`` or ``best``.
    out:
        Directory to create; it appears only once the signature and all hashes check out.

    Returns
    -------
    dict[str, Any]
        The verified manifest.

    Raises
    ------
    PullError
        Bad arguments, missing files, unreachable or refusing registry, unknown version.
    BundleError, BundleSignatureError
        The downloaded bundle fails verification (message names the file).
    """
    out = Path(out)
    spec = _check_spec(version)
    pub = load_public_key(_default_public_key(certs, public_key))
    _check_out(out, replace)
    client = _RegistryClient(server, certs, timeout)
    try:
        number = client.resolve(spec)
        with atomic_dir(out, replace=replace) as tmp:
            for name in BUNDLE_FILES:
                client.get(f"/v1/models/{number}/files/{name}", sink=tmp / name)
            try:
                bundle = load_bundle(tmp, pub, require_signature=True)
            except BundleError as err:
                # Name the version and source, not the temporary directory that is about to go.
                message = str(err).replace(f"bundle {tmp}: ", "").replace(f"bundle {tmp} ", "")
                raise type(err)(
                    f"model v{number:04d} from {client.address} failed verification: {message}"
                ) from err
    finally:
        client.close()
    return bundle.manifest
