"""Tests for common/certs.py: files, modes, SANs, chains, refusals and a real TLS handshake."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from common import certs
from common.certs import (
    CertError,
    FederationPaths,
    HospitalPaths,
    check_hospital_certs,
    check_private_key_permissions,
    check_server_certs,
    init_federation,
    init_hospital,
    load_certificate,
    verify_signed_by,
)
from tests.limits import SOCKET_S

TIMEOUT = SOCKET_S


@pytest.fixture
def fed(tmp_path: Path) -> FederationPaths:
    return init_federation(tmp_path / "certs", ["superlink", "fl.example.org"], ["10.1.2.3"])


@pytest.fixture
def hospital(fed: FederationPaths) -> HospitalPaths:
    return init_hospital("hospital-a", fed.out / "hospitals", fed.out)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ---------------------------------------------------------------------------- federation


def test_init_federation_writes_private_keys_0600_and_certs_0644(fed: FederationPaths) -> None:
    modes = {p.name: _mode(p) for p in fed.out.iterdir()}
    assert modes == {
        "ca.crt": 0o644,
        "ca.key": 0o600,
        "server.pem": 0o644,
        "server.key": 0o600,
        "signing.key": 0o600,
        "signing.pub": 0o644,
    }


def test_server_cert_san_has_given_names_ips_and_loopback(fed: FederationPaths) -> None:
    cert = x509.load_pem_x509_certificate(fed.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink", "fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_server_cert_is_server_auth_only_and_ca_is_a_ca(fed: FederationPaths) -> None:
    server = x509.load_pem_x509_certificate(fed.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True


def test_server_cert_chain_verifies_against_ca(fed: FederationPaths) -> None:
    verify_signed_by(fed.server_cert, fed.ca_cert)
    assert check_server_certs(fed.out) == fed


def test_second_init_refuses_and_changes_nothing(fed: FederationPaths) -> None:
    before = _snapshot(fed.out)
    with pytest.raises(CertError, match="ca.crt already exists"):
        init_federation(fed.out, ["superlink"], [])
    assert _snapshot(fed.out) == before


def test_init_with_force_replaces_the_files(fed: FederationPaths) -> None:
    before = fed.ca_cert.read_bytes()
    init_federation(fed.out, ["superlink"], [], force=True)
    assert fed.ca_cert.read_bytes() != before
    check_server_certs(fed.out)


def test_init_refuses_one_existing_file_among_many(tmp_path: Path) -> None:
    (tmp_path / "signing.pub").write_text("mine")
    with pytest.raises(CertError, match="signing.pub already exists"):
        init_federation(tmp_path, ["superlink"], [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signing.pub"]


def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = certs._write
    calls = []

    def fail_on_third(path: Path, data: bytes, mode: int) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(path, data, mode)

    monkeypatch.setattr(certs, "_write", fail_on_third)
    with pytest.raises(OSError, match="disk full"):
        init_federation(tmp_path / "certs", ["superlink"], [])
    assert list((tmp_path / "certs").iterdir()) == []


def test_bad_server_ip_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="'10.0.0.300' is not an IPv4 or IPv6 address"):
        init_federation(tmp_path / "certs", ["superlink"], ["10.0.0.300"])
    assert not (tmp_path / "certs").exists()


def test_bad_server_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CertError, match="'super link' is not a DNS name"):
        init_federation(tmp_path / "certs", ["super link"], [])


# ---------------------------------------------------------------------------- hospitals


def test_hospital_folder_files_and_modes(hospital: HospitalPaths) -> None:
    modes = {p.name: _mode(p) for p in hospital.out.iterdir()}
    assert hospital.out.name == "hospital-a"
    assert modes == {
        "node_key": 0o600,
        "node_key.pub": 0o644,
        "client.pem": 0o644,
        "client.key": 0o600,
        "ca.crt": 0o644,
        "signing.pub": 0o644,
    }


def test_hospital_node_key_is_openssh_ec_p384(hospital: HospitalPaths) -> None:
    key = serialization.load_ssh_private_key(hospital.node_key.read_bytes(), password=None)
    pub = serialization.load_ssh_public_key(hospital.node_pub.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)
    assert pub == key.public_key()


def test_hospital_keys_load_with_flowers_own_loaders(hospital: HospitalPaths) -> None:
    # Flower's parsers for `flower-supernode --auth-supernode-private-key` and
    # `flwr supernode register`: private helpers, so imported here only.
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(
        auth_supernode_private_key=str(hospital.node_key), auth_supernode_public_key=None
    )
    loaded = _try_setup_client_authentication(args)  # exits the process if it cannot parse
    registered = try_load_public_key(hospital.node_pub)  # same: exits on a bad key
    assert loaded is not None
    derived = loaded[1].public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert registered == derived  # the key the server registers is the one the node signs with


def test_client_cert_signed_by_ca_with_client_auth(hospital: HospitalPaths) -> None:
    verify_signed_by(hospital.client_cert, hospital.ca_cert)
    cert = x509.load_pem_x509_certificate(hospital.client_cert.read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cn == "hospital-a"


def test_check_hospital_certs_accepts_a_fresh_folder(hospital: HospitalPaths) -> None:
    assert check_hospital_certs(hospital.out) == hospital


def test_second_hospital_init_refuses(hospital: HospitalPaths, fed: FederationPaths) -> None:
    before = _snapshot(hospital.out)
    with pytest.raises(CertError, match="node_key already exists"):
        init_hospital("hospital-a", fed.out / "hospitals", fed.out)
    assert _snapshot(hospital.out) == before


@pytest.mark.parametrize("name", ["Hospital-A", "-a", "a_b", "a" * 64, ""])
def test_bad_hospital_name_is_refused(fed: FederationPaths, name: str) -> None:
    with pytest.raises(CertError, match="hospital name"):
        init_hospital(name, fed.out / "hospitals", fed.out)


def test_hospital_init_needs_the_ca_key(fed: FederationPaths) -> None:
    fed.ca_key.unlink()
    with pytest.raises(CertError, match=r"private key .*ca.key does not exist"):
        init_hospital("hospital-a", fed.out / "hospitals", fed.out)


def test_node_key_pub_of_another_hospital_is_refused(
    hospital: HospitalPaths, fed: FederationPaths
) -> None:
    other = init_hospital("hospital-b", fed.out / "hospitals", fed.out)
    hospital.node_pub.write_bytes(other.node_pub.read_bytes())
    with pytest.raises(CertError, match="does not belong to the key"):
        check_hospital_certs(hospital.out)


# ---------------------------------------------------------------------------- refusals


def test_loose_private_key_permissions_are_refused(fed: FederationPaths) -> None:
    fed.server_key.chmod(0o644)
    with pytest.raises(CertError) as info:
        check_private_key_permissions(fed.server_key)
    assert str(info.value) == (
        f"private key {fed.server_key} has permissions 0644; expected 0600 "
        f"(run: chmod 600 {fed.server_key})"
    )


def test_check_server_certs_refuses_loose_signing_key(fed: FederationPaths) -> None:
    fed.signing_key.chmod(0o640)
    with pytest.raises(CertError, match="has permissions 0640"):
        check_server_certs(fed.out)


def test_check_server_certs_names_a_missing_file(fed: FederationPaths) -> None:
    fed.server_cert.unlink()
    with pytest.raises(CertError, match=r"server.pem is missing \(create it with: medfed certs"):
        check_server_certs(fed.out)


def test_expired_certificate_is_refused_with_its_date(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    path = tmp_path / "old.crt"
    path.write_bytes(certs._cert_pem(certs._make_ca(key, days=30, now=start)))
    with pytest.raises(CertError, match=r"old.crt expired on 2020-01-31 00:00 UTC"):
        load_certificate(path, "server certificate")


def test_not_yet_valid_certificate_is_refused_with_its_date(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    start = dt.datetime(2999, 1, 1, tzinfo=dt.UTC)  # valid from 5 minutes before start
    path = tmp_path / "future.crt"
    path.write_bytes(certs._cert_pem(certs._make_ca(key, days=30, now=start)))
    with pytest.raises(CertError, match=r"not valid before 2998-12-31 23:55 UTC"):
        load_certificate(path, "server certificate")


def test_non_pem_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    path.write_text("not a certificate")
    with pytest.raises(CertError, match=r"ca.crt is not a PEM certificate"):
        load_certificate(path, "federation CA certificate")


def test_certificate_from_another_federation_is_refused(
    fed: FederationPaths, tmp_path: Path
) -> None:
    other = init_federation(tmp_path / "other", ["superlink"], [])
    with pytest.raises(CertError) as info:
        verify_signed_by(other.server_cert, fed.ca_cert)
    assert str(info.value) == (
        f"certificate {other.server_cert} was not issued by the federation CA {fed.ca_cert}"
    )


def test_check_server_certs_refuses_a_server_cert_from_another_ca(
    fed: FederationPaths, tmp_path: Path
) -> None:
    other = init_federation(tmp_path / "other", ["superlink"], [])
    fed.server_cert.write_bytes(other.server_cert.read_bytes())
    with pytest.raises(CertError, match="was not issued by the federation CA"):
        check_server_certs(fed.out)


def test_check_hospital_certs_refuses_a_ca_copy_from_another_federation(
    hospital: HospitalPaths, tmp_path: Path
) -> None:
    other = init_federation(tmp_path / "other", ["superlink"], [])
    hospital.ca_cert.write_bytes(other.ca_cert.read_bytes())
    with pytest.raises(CertError, match="was not issued by the federation CA"):
        check_hospital_certs(hospital.out)


# ---------------------------------------------------------------------------- real TLS


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str
) -> tuple[bytes, dict | None]:
    """One TLS connection over loopback; returns (echoed bytes, client cert seen by server)."""
    seen: dict = {}
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["peer"] = tls.getpeercert()
                tls.sendall(tls.recv(64))
        except (OSError, ssl.SSLError) as err:
            seen["error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                tls.sendall(b"hello")
                echoed = tls.recv(64)
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert "error" not in seen, seen.get("error")
    return echoed, seen.get("peer")


def test_tls_handshake_with_server_cert_trusted_via_ca(fed: FederationPaths) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(fed.server_cert, fed.server_key)
    client_ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
    echoed, _ = _handshake(server_ctx, client_ctx, "localhost")
    assert echoed == b"hello"


def test_mutual_tls_with_hospital_client_cert(
    hospital: HospitalPaths, fed: FederationPaths
) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(fed.server_cert, fed.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=str(fed.ca_cert))
    client_ctx = ssl.create_default_context(cafile=str(hospital.ca_cert))
    client_ctx.load_cert_chain(hospital.client_cert, hospital.client_key)
    echoed, peer = _handshake(server_ctx, client_ctx, "superlink")
    assert echoed == b"hello"
    assert peer is not None and ((("commonName", "hospital-a"),) in peer["subject"])


def test_tls_client_refuses_a_server_from_another_federation(
    fed: FederationPaths, tmp_path: Path
) -> None:
    other = init_federation(tmp_path / "other", ["superlink"], [])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(other.server_cert, other.server_key)
    client_ctx = ssl.create_default_context(cafile=str(fed.ca_cert))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ctx, client_ctx, "localhost")
