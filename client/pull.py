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

import hashlib
import http.client
import io
import json
import re
import socket
import ssl
import time
from functools import partial
from pathlib import Path
from typing import Any

from client.trust import verification_key
from common import address as common_address
from common.atomic import atomic_dir, atomic_write_text
from common.bundle import (
    BACKBONE_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleError,
    BundleSignatureError,
    copy_bundle,
    load_bundle,
    parse_manifest,
    read_manifest,
)
from common.certs import HospitalPaths
from common.config import show
from common.names import printable, sanitise_name
from common.registry import Registry
from common.settings import medfed_home
from common.signing import SignatureError, load_public_key, verify

DEFAULT_PORT = 8443  # `medfed server --registry-port` default
DEFAULT_TIMEOUT_S = 30.0  # per socket operation, not per download
# Per request, whole: a registry that drips one byte per socket timeout cannot hold a pull
# forever. A weight file gets more time in proportion to its size (see _RegistryClient.get).
DEFAULT_DEADLINE_S = 600.0
MIN_BYTES_PER_S = 256 << 10  # the slowest link a weight download is given time for
MAX_FILE_BYTES = 8 << 30  # refuse absurd downloads rather than fill the disk
MAX_VERSIONS_BYTES = 1 << 20  # /v1/versions: ~100,000 version numbers, far beyond any registry
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
    spec = str(version)
    if spec not in ("latest", "best") and not re.fullmatch(r"[0-9]{1,9}", spec):
        raise PullError(f"--version must be a number, 'latest' or 'best'; got {version!r}")
    return spec


def _check_out(out: Path, replace: bool) -> None:
    if out.exists() and not replace:
        raise PullError(
            f"output directory {out} already exists; choose a new --out or remove it first"
        )


# ---------------------------------------------------------------------------- from a directory


def pull_from_registry(
    registry: Path,
    version: str,
    out: Path,
    public_key: Path | None = None,
    *,
    replace: bool = False,
    unsigned: bool = False,
) -> dict[str, Any]:
    """Copy version ``version`` (N | latest | best) of a registry directory to ``out``.

    Hashes are always checked, and the signature with ``public_key`` (default: the
    federation's key in ``$MEDFED_HOME``) unless ``unsigned``.

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
    src = Registry(registry).resolve(spec)
    pub = verification_key(public_key, unsigned=unsigned)
    signed = read_manifest(src, pub, require_signature=pub is not None).get("version")
    number = int(src.name[1:])
    if signed != number:
        raise BundleError(f"registry {registry}: {src.name} holds a signed manifest of version "
                          f"{show(signed)}")
    state = PullState(_registry_key(registry))
    _refuse_rollback(number, spec, state, f"model {src.name} from registry {registry}")
    manifest = copy_bundle(src, out, pub, replace=replace)
    if pub is not None:  # an unsigned number could be forged high and lock out later pulls
        state.hold(number, spec)
    return manifest


def _registry_key(registry: Path) -> str:
    """The PullState name of a registry directory: its resolved path, hashed (a path is
    longer than a state file's name may be), after a readable prefix."""
    resolved = str(Path(registry).resolve())
    return f"registry-{hashlib.sha256(resolved.encode()).hexdigest()[:16]}-{Path(resolved).name}"


# ---------------------------------------------------------------------------- from the server


def parse_address(server: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6addr]:PORT``; the port defaults to 8443)."""
    try:
        return common_address.parse_address(server.strip(), "--server", DEFAULT_PORT)
    except common_address.AddressError as err:
        raise PullError(str(err)) from None


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


class _DeadlinePassed(TimeoutError):
    """A request's overall deadline passed (not one socket operation's timeout)."""


class _DeadlineReader(io.RawIOBase):
    """The socket as a response reads it (status line, headers, body): no read may end after
    the request's deadline, however slowly the server sends."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, timeout: float | None,
                 deadline: float) -> None:
        # `raw` is the socket's own reader: it keeps the socket open while the response
        # lives (http.client closes its side as soon as the headers say "close")
        self.raw, self.sock, self.timeout, self.deadline = raw, sock, timeout, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _DeadlinePassed
        cut_by_deadline = self.timeout is None or left < self.timeout
        self.sock.settimeout(left if cut_by_deadline else self.timeout)
        try:
            return self.raw.readinto(buffer)
        except TimeoutError:
            if cut_by_deadline:
                raise _DeadlinePassed from None
            raise  # the per-operation timeout: "no answer in N s"

    def close(self) -> None:
        self.raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """A response whose every socket read goes through a :class:`_DeadlineReader`."""

    def __init__(self, sock: socket.socket, *args: Any, timeout: float | None,
                 deadline: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        raw = self.fp.detach()  # nothing was read yet: no buffered byte is lost
        self.fp = io.BufferedReader(_DeadlineReader(raw, sock, timeout, deadline))


class _RegistryClient:
    """One keep-alive HTTPS connection to the registry; every failure becomes a PullError."""

    def __init__(self, server: str, certs: Path | None, timeout: float,
                 deadline: float = DEFAULT_DEADLINE_S) -> None:
        host, port = parse_address(server)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.timeout = timeout
        self.deadline = deadline
        context, self.paths = _tls_context(certs)
        self.conn = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def get(self, path: str, sink: Path | None = None, limit: int = MAX_FILE_BYTES,
            sha256: str | None = None) -> bytes:
        """GET ``path``; return the body, or stream it into ``sink`` (returns b'').

        More than `limit` bytes is refused; with `sha256` the streamed bytes must hash to it.
        The whole answer must arrive within the client's deadline (plus, for a streamed
        file, the time `limit` bytes take at MIN_BYTES_PER_S).
        """
        allowed = self.deadline + (limit / MIN_BYTES_PER_S if sink is not None else 0.0)
        self.conn.response_class = partial(  # type: ignore[assignment]  # http.client only calls it
            _DeadlineResponse, timeout=self.timeout, deadline=time.monotonic() + allowed)
        if self.conn.sock is not None:  # a keep-alive socket: the last read may have cut it
            self.conn.sock.settimeout(self.timeout)
        try:
            self.conn.request("GET", path)
            response = self.conn.getresponse()
            if response.status != 200:
                raise self._status_error(path, response)
            if sink is None:
                body = response.read(limit + 1)
                if len(body) > limit:
                    raise PullError(f"{path} from {self.address} is larger than {limit} bytes; "
                                    "refused")
                return body
            self._stream(response, path, sink, limit, sha256)
            return b""
        except _DeadlinePassed as err:
            raise PullError(
                f"the model registry at {self.address} did not finish sending {path} within "
                f"{allowed:g} s; gave up (overloaded, or stalling on purpose)"
            ) from err
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

    def _stream(self, response: http.client.HTTPResponse, path: str, sink: Path, limit: int,
                sha256: str | None) -> None:
        written = 0
        digest = hashlib.sha256()
        # A failed write (disk full, quota) is this machine's, not the registry's: it gets its
        # own sentence instead of falling into get()'s "cannot reach the registry". Unbuffered,
        # so that it fails in write() and not again in close().
        try:
            handle = open(sink, "wb", buffering=0)
        except OSError as err:
            raise self._local_error(sink, path, err) from err
        with handle:
            while chunk := response.read(_CHUNK):
                written += len(chunk)
                if written > limit:
                    raise BundleError(f"exceeds the {limit} bytes its signed manifest allows; "
                                      "refused")
                digest.update(chunk)
                try:
                    left = memoryview(chunk)
                    while left:  # a raw write may take only part (e.g. the disk fills up)
                        left = left[handle.write(left):]
                except OSError as err:
                    raise self._local_error(sink, path, err) from err
        if sha256 is not None and digest.hexdigest() != sha256:
            raise BundleError(f"has sha256 {digest.hexdigest()[:16]}...; expected "
                              f"{sha256[:16]}... from the signed manifest")

    def _local_error(self, sink: Path, path: str, err: OSError) -> PullError:
        # `sink` sits in a temporary directory about to go: name the directory of --out
        return PullError(f"cannot write {sink.name} to the local directory {sink.parent.parent} "
                         f"({err.strerror or err}) while downloading {path} from "
                         f"{self.address}; nothing was kept")

    def _status_error(self, path: str, response: http.client.HTTPResponse) -> PullError:
        body = response.read(64 * 1024)
        try:
            # the server's words go to a terminal: no escape sequences, bounded length
            detail = printable(json.loads(body)["detail"])
        except (ValueError, KeyError, TypeError):
            detail = f"HTTP {response.status} {printable(response.reason)}"
        if response.status == 404:
            return PullError(f"the model registry at {self.address}: {detail}")
        return PullError(
            f"the model registry at {self.address} answered HTTP {response.status} for {path} "
            f"({detail})"
        )

    def resolve(self, spec: str) -> int:
        """Pin ``latest``/``best`` to a number once, so all files come from one version."""
        if spec not in ("latest", "best"):
            return int(spec)
        # PullError is a ValueError: keep it out of the try
        body = self.get("/v1/versions", limit=MAX_VERSIONS_BYTES)
        try:
            version = json.loads(body)[spec]
        except (ValueError, KeyError, TypeError) as err:
            raise PullError(
                f"the model registry at {self.address} sent a malformed /v1/versions answer"
            ) from err
        if version is None:
            raise PullError(f"the model registry at {self.address} has no '{spec}' version yet")
        if not isinstance(version, int) or isinstance(version, bool):
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
    deadline: float = DEFAULT_DEADLINE_S,
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
    timeout:
        Seconds one socket operation may take.
    deadline:
        Seconds one whole request may take (a weight file gets more, by its size).

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
    client = _RegistryClient(server, certs, timeout, deadline)
    try:
        number = client.resolve(spec)
        where = f"model v{number:04d} from {client.address}"
        # 1. the small signed part first: nothing large is fetched from an unverified source
        manifest_bytes = client.get(f"/v1/models/{number}/files/{MANIFEST_FILE}",
                                    limit=MAX_MANIFEST_BYTES)
        signature = client.get(f"/v1/models/{number}/files/{SIGNATURE_FILE}",
                               limit=MAX_SIGNATURE_BYTES)
        try:
            verify(pub, manifest_bytes, signature, where=f"{where}: {MANIFEST_FILE}")
        except SignatureError as err:
            raise BundleSignatureError(str(err)) from err
        manifest = parse_manifest(manifest_bytes, where)
        # 2. the version it signs is the one asked for, and not older than what we hold
        state = PullState(client.address)
        _check_version(manifest, number, spec, state, where)
        # 3. the weights, streamed against their signed hashes and sizes
        with atomic_dir(out, replace=replace) as tmp:
            (tmp / MANIFEST_FILE).write_bytes(manifest_bytes)
            (tmp / SIGNATURE_FILE).write_bytes(signature)
            sizes = manifest.get("sizes") or {}
            for name, digest in manifest["files"].items():
                if name not in (BACKBONE_FILE, HEAD_FILE):
                    raise BundleError(f"{where}: the manifest lists {name!r}, which the "
                                      "registry does not serve")
                cap = _size_cap(sizes.get(name))
                try:
                    client.get(f"/v1/models/{number}/files/{name}", sink=tmp / name,
                               limit=cap, sha256=digest)
                except BundleError as err:
                    raise BundleError(f"{where}: {name} {err}") from err
            try:
                bundle = load_bundle(tmp, pub, require_signature=True)
            except BundleError as err:
                # Name the version and source, not the temporary directory that is about to go.
                message = str(err).replace(f"bundle {tmp}: ", "").replace(f"bundle {tmp} ", "")
                raise type(err)(f"{where} failed verification: {message}") from err
        state.hold(number, spec)
    finally:
        client.close()
    return bundle.manifest


MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few KB of JSON
MAX_SIGNATURE_BYTES = 1024  # an Ed25519 signature is 64 bytes


def _size_cap(listed: object) -> int:
    """The signed size of a file when the manifest lists it, else the global cap."""
    if isinstance(listed, int) and not isinstance(listed, bool) and 0 <= listed <= MAX_FILE_BYTES:
        return listed
    return MAX_FILE_BYTES


def _check_version(manifest: dict[str, Any], number: int, spec: str, state: PullState,
                   where: str) -> None:
    signed = manifest.get("version")
    if not isinstance(signed, int) or isinstance(signed, bool) or signed != number:
        raise BundleError(f"{where}: the signed manifest is of version {show(signed)}, not "
                          f"{number}: the registry served another version than it named")
    _refuse_rollback(signed, spec, state, where)


def _refuse_rollback(signed: int, spec: str, state: PullState, where: str) -> None:
    """`latest`/`best` must not be older than what this hospital already holds from there."""
    # `latest` is the newest version published: never older than one already held. `best`
    # only ever moves forward (a later round must score at least as well to take it).
    floor = state.newest if spec == "latest" else state.best if spec == "best" else None
    if floor is not None and signed < floor:
        held = "a newer version" if spec == "latest" else "'best'"
        raise BundleError(
            f"{where}: the registry's '{spec}' is v{signed:04d}, older than v{floor:04d} "
            f"which this hospital already holds as {held}; refused as a rollback (pull a "
            "version by number to go back on purpose)")


class PullState:
    """Per registry: the newest version and the newest `best` a hospital pulled (rollback
    protection), in `$MEDFED_HOME/pulls/<address>.json`."""

    def __init__(self, address: str) -> None:
        self.path = medfed_home() / "pulls" / f"{sanitise_name(address)}.json"
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        self.newest = _version_or_none(raw, "newest")
        self.best = _version_or_none(raw, "best")

    def hold(self, version: int, spec: str) -> None:
        """Record that `version` is now held (both marks only ever move forward)."""
        newest = max(version, self.newest) if self.newest is not None else version
        best = self.best
        if spec == "best":
            best = max(version, best) if best is not None else version
        if (newest, best) == (self.newest, self.best):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"newest": newest, "best": best}) + "\n")
        self.newest, self.best = newest, best


def _version_or_none(raw: object, key: str) -> int | None:
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
