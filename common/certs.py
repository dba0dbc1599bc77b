"""Certificates and keys for a secure federation: one CA, the server, one folder per hospital.

The federation CA (EC P-384) signs the server's TLS certificate (used by the Flower SuperLink
and the model registry) and each hospital's client certificate (mutual TLS to the registry).
Each hospital also gets an OpenSSH EC key pair for Flower SuperNode authentication, and the
server gets an Ed25519 key that signs model bundles. Private keys are written with mode 0600,
existing files are never overwritten unless asked, and files appear only once all are made.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_MIN_DAYS = 3650  # the CA outlives the certificates it signs, so renewing them keeps trust
_CLOCK_SKEW = dt.timedelta(minutes=5)  # tolerate peers whose clock is slightly behind
HOSPITAL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # always fullmatch: no "\n" tail
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_PEM = serialization.Encoding.PEM
_PKCS8 = serialization.PrivateFormat.PKCS8
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_NO_PASSWORD = serialization.NoEncryption()
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)  # what Flower accepts for node auth


class CertError(ValueError):
    """A certificate or key is missing, malformed, expired, untrusted or badly protected."""


@dataclass(frozen=True)
class FederationPaths:
    """Files of the federation (server side) in ``out``."""

    out: Path

    @property
    def ca_cert(self) -> Path:
        return self.out / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.out / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.out / "server.key"

    @property
    def signing_key(self) -> Path:
        return self.out / "signing.key"

    @property
    def signing_pub(self) -> Path:
        return self.out / "signing.pub"


@dataclass(frozen=True)
class HospitalPaths:
    """Files of one hospital in its own folder ``out`` (``<certs out>/<name>``)."""

    out: Path

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def node_key(self) -> Path:
        return self.out / "node_key"

    @property
    def node_pub(self) -> Path:
        return self.out / "node_key.pub"

    @property
    def client_cert(self) -> Path:
        return self.out / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.out / "client.key"

    @property
    def ca_cert(self) -> Path:
        return self.out / "ca.crt"

    @property
    def signing_pub(self) -> Path:
        return self.out / "signing.pub"


# ---------------------------------------------------------------------------- building


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(
    key: ec.EllipticCurvePrivateKey, days: int, now: dt.datetime | None = None
) -> x509.Certificate:
    """Self-signed CA certificate valid for ``days`` from ``now`` (negative: already expired)."""
    now = now or dt.datetime.now(dt.UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name("medfed federation CA"))
        .issuer_name(_name("medfed federation CA"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return builder.sign(key, hashes.SHA384())


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public: ec.EllipticCurvePublicKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    days: int,
    san: list[x509.GeneralName] | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Leaf certificate for ``public`` with one extended key usage, ending no later than the CA."""
    now = now or dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA384())


def _server_san(server_names: Iterable[str], server_ips: Iterable[str]) -> list[x509.GeneralName]:
    names = list(dict.fromkeys([*server_names, "localhost"]))
    for name in names:
        if not _DNS_NAME.fullmatch(name):
            raise CertError(
                f"server name {name!r} is not a DNS name (letters, digits, '-' and '.'; "
                "pass IP addresses with --server-ip)"
            )
    ips = []
    for text in [*server_ips, "127.0.0.1", "::1"]:
        try:
            ips.append(ipaddress.ip_address(text))
        except ValueError as err:
            raise CertError(f"server IP {text!r} is not an IPv4 or IPv6 address") from err
    return [x509.DNSName(n) for n in names] + [x509.IPAddress(ip) for ip in dict.fromkeys(ips)]


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_PEM, _PKCS8, _NO_PASSWORD)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(_PEM)


# ---------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + mode at creation: a private key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask may have removed bits we want (0644)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _install(out: Path, files: dict[str, tuple[bytes, int]], force: bool) -> None:
    """Write ``files`` (name -> (content, mode)) into ``out``, all or nothing."""
    out.mkdir(parents=True, exist_ok=True)
    if not force:
        for name in files:
            if (out / name).exists():
                raise CertError(
                    f"{out / name} already exists; refusing to overwrite it "
                    "(move it away or pass --force)"
                )
    # Same filesystem as the targets, so the final moves are renames.
    tmp = Path(tempfile.mkdtemp(prefix=".medfed-certs-", dir=out))
    try:
        for name, (data, mode) in files.items():
            _write(tmp / name, data, mode)
        for name in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_days(days: int) -> None:
    if days < 1:
        raise CertError(f"certificate validity must be at least 1 day; got days={days}")


# ---------------------------------------------------------------------------- public API


def init_federation(
    out: Path,
    server_names: list[str],
    server_ips: list[str],
    days: int = 825,
    force: bool = False,
) -> FederationPaths:
    """Create the federation CA, the server certificate and the bundle signing key in ``out``.

    The server certificate (valid ``days``) names every ``server_names`` entry plus
    ``localhost``, and every ``server_ips`` entry plus 127.0.0.1 and ::1. The CA is valid for
    ``max(days, CA_MIN_DAYS)``. Raises :class:`CertError` if any target file exists (unless
    ``force``) or a name/IP is invalid; nothing is written in that case.
    """
    _check_days(days)
    out = Path(out)
    paths = FederationPaths(out)
    san = _server_san(server_names, server_ips)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _make_ca(ca_key, max(days, CA_MIN_DAYS))
    server_key = ec.generate_private_key(ec.SECP384R1())
    # X.509 caps the common name at 64 characters; clients match the SAN anyway.
    first = server_names[0] if server_names else "localhost"
    common_name = first if len(first) <= 64 else "medfed server"
    server_cert = _issue(
        ca_cert,
        ca_key,
        server_key.public_key(),
        common_name,
        ExtendedKeyUsageOID.SERVER_AUTH,
        days,
        san,
    )
    signing_key = ed25519.Ed25519PrivateKey.generate()
    files = {
        paths.ca_cert.name: (_cert_pem(ca_cert), 0o644),
        paths.ca_key.name: (_key_pem(ca_key), 0o600),
        paths.server_cert.name: (_cert_pem(server_cert), 0o644),
        paths.server_key.name: (_key_pem(server_key), 0o600),
        paths.signing_key.name: (_key_pem(signing_key), 0o600),
        paths.signing_pub.name: (signing_key.public_key().public_bytes(_PEM, _SPKI), 0o644),
    }
    _install(out, files, force)
    return paths


def init_hospital(
    name: str, out: Path, ca_dir: Path, days: int = 825, force: bool = False
) -> HospitalPaths:
    """Create ``out/<name>/`` with the hospital's node key pair, client certificate and CA copy.

    Needs the CA certificate and key in ``ca_dir`` (from :func:`init_federation`). The node key
    (OpenSSH EC P-384) authenticates the hospital's Flower SuperNode once ``node_key.pub`` is
    registered at the server; ``client.pem``/``client.key`` (CN = ``name``, clientAuth) are for
    mutual TLS to the model registry. ``signing.pub`` is copied when ``ca_dir`` has it.
    """
    if not HOSPITAL_NAME.fullmatch(name):
        raise CertError(
            f"hospital name {name!r} is invalid; expected 1-63 lowercase letters, digits or '-', "
            "starting with a letter or digit"
        )
    _check_days(days)
    fed = FederationPaths(Path(ca_dir))
    ca_cert = load_certificate(fed.ca_cert, "federation CA certificate")
    ca_key = _load_private_key(fed.ca_key, "federation CA key")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not _same_public_key(ca_cert, ca_key):
        raise CertError(f"CA key {fed.ca_key} does not belong to the CA certificate {fed.ca_cert}")
    paths = HospitalPaths(Path(out) / name)
    node_key = ec.generate_private_key(ec.SECP384R1())
    node_pub = node_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    client_key = ec.generate_private_key(ec.SECP384R1())
    client_cert = _issue(
        ca_cert, ca_key, client_key.public_key(), name, ExtendedKeyUsageOID.CLIENT_AUTH, days
    )
    openssh_key = node_key.private_bytes(_PEM, serialization.PrivateFormat.OpenSSH, _NO_PASSWORD)
    files = {
        paths.node_key.name: (openssh_key, 0o600),
        paths.node_pub.name: (node_pub + f" medfed-{name}\n".encode(), 0o644),
        paths.client_cert.name: (_cert_pem(client_cert), 0o644),
        paths.client_key.name: (_key_pem(client_key), 0o600),
        paths.ca_cert.name: (fed.ca_cert.read_bytes(), 0o644),
    }
    if fed.signing_pub.exists():
        files[paths.signing_pub.name] = (fed.signing_pub.read_bytes(), 0o644)
    _install(paths.out, files, force)
    return paths


def check_private_key_permissions(path: Path) -> None:
    """Raise :class:`CertError` if the private key ``path`` is missing or readable by others."""
    path = Path(path)
    if not path.is_file():
        raise CertError(f"private key {path} does not exist")
    if os.name == "nt":  # no POSIX modes; rely on the folder's ACL
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CertError(
            f"private key {path} has permissions {mode:04o}; expected 0600 (run: chmod 600 {path})"
        )


def load_certificate(path: Path, what: str) -> x509.Certificate:
    """Load a PEM certificate and check that it is valid now; ``what`` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise CertError(f"{what} {path} does not exist")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertError(f"{what} {path} is not a PEM certificate") from err
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        raise CertError(
            f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            "issue a new one"
        )
    if cert.not_valid_before_utc > now:
        raise CertError(
            f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock"
        )
    return cert


def verify_signed_by(cert_path: Path, ca_path: Path) -> None:
    """Raise :class:`CertError` unless ``cert_path`` was signed by the CA in ``ca_path``."""
    cert = load_certificate(cert_path, "certificate")
    ca = load_certificate(ca_path, "federation CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertError(
            f"certificate {cert_path} was not issued by the federation CA {ca_path}"
        ) from err


def check_server_certs(certs_dir: Path) -> FederationPaths:
    """Check that ``certs_dir`` holds everything the server needs, protected and valid.

    The CA key is not needed at run time (keep it offline); if present it must be 0600 too.
    """
    paths = FederationPaths(Path(certs_dir))
    needed = [paths.ca_cert, paths.server_cert, paths.server_key, paths.signing_key]
    _require(needed, f"medfed certs init --out {paths.out} --server-name NAME")
    for key in (paths.server_key, paths.signing_key):
        check_private_key_permissions(key)
    if paths.ca_key.exists():
        check_private_key_permissions(paths.ca_key)
    verify_signed_by(paths.server_cert, paths.ca_cert)
    _check_key_matches(paths.server_cert, paths.server_key, "server")
    # a hospital's client certificate in its place starts the server, then every pull fails
    # the hospital's check ("unsuitable certificate purpose")
    if ExtendedKeyUsageOID.SERVER_AUTH not in _extended_usages(
            load_certificate(paths.server_cert, "server certificate")):
        raise CertError(f"server certificate {paths.server_cert} is not marked for TLS "
                        "servers; make it with `medfed certs init`")
    if not isinstance(
        _load_private_key(paths.signing_key, "signing key"), ed25519.Ed25519PrivateKey
    ):
        raise CertError(f"signing key {paths.signing_key} is not an Ed25519 private key")
    return paths


MAX_PUBLIC_KEY_BYTES = 64 << 10  # an OpenSSH public key is a few hundred bytes


def read_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A node's public key (`node_key.pub`, as `medfed certs hospital` writes it): an
    OpenSSH elliptic-curve key, which Flower's node authentication takes."""
    try:
        pub = serialization.load_ssh_public_key(Path(path).read_bytes()[:MAX_PUBLIC_KEY_BYTES])
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise CertError(f"{path} is not an OpenSSH public key") from err
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise CertError(f"{path} is not an elliptic-curve key, which Flower's node "
                        "authentication needs")
    return pub


def check_hospital_certs(hospital_dir: Path) -> HospitalPaths:
    """Check that a hospital folder holds its node key, client certificate and the CA."""
    paths = HospitalPaths(Path(hospital_dir))
    needed = [paths.node_key, paths.client_cert, paths.client_key, paths.ca_cert]
    _require(needed, f"medfed certs hospital --name {paths.name} --out {paths.out.parent}")
    for key in (paths.node_key, paths.client_key):
        check_private_key_permissions(key)
    node_key = _load_node_key(paths.node_key)
    if paths.node_pub.exists():
        pub = read_node_public_key(paths.node_pub)
        if pub != node_key.public_key():
            raise CertError(f"{paths.node_pub} does not belong to the key {paths.node_key}")
    verify_signed_by(paths.client_cert, paths.ca_cert)
    _check_key_matches(paths.client_cert, paths.client_key, "client")
    cert = load_certificate(paths.client_cert, "client certificate")
    if ExtendedKeyUsageOID.CLIENT_AUTH not in _extended_usages(cert):
        raise CertError(f"client certificate {paths.client_cert} is not marked for TLS clients")
    return paths


# ---------------------------------------------------------------------------- checking helpers


def _require(paths: list[Path], fix: str) -> None:
    for path in paths:
        if not path.is_file():
            raise CertError(f"{path} is missing (create it with: {fix})")


def _load_private_key(path: Path, what: str) -> PrivateKeyTypes:
    check_private_key_permissions(path)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertError(f"{what} {path} is not an unencrypted PEM private key") from err


def _load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    # The same parse Flower's SuperNode does for --auth-supernode-private-key.
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CertError(f"node key {path} is not an unencrypted OpenSSH private key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST_CURVES):
        raise CertError(f"node key {path} is not an EC key on a NIST curve (P-256/384/521)")
    return key


def _same_public_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    return cert.public_key().public_bytes(_PEM, _SPKI) == key.public_key().public_bytes(_PEM, _SPKI)


def _check_key_matches(cert_path: Path, key_path: Path, what: str) -> None:
    cert = load_certificate(cert_path, f"{what} certificate")
    if not _same_public_key(cert, _load_private_key(key_path, f"{what} key")):
        raise CertError(f"{what} key {key_path} does not belong to the certificate {cert_path}")


def _extended_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []
