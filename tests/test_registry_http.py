"""Tests for server/registry_http.py: endpoints (in-process) and mutual TLS (real uvicorn)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from common.certs import CertError, FederationPaths, HospitalPaths, init_federation, init_hospital
from common.registry import Registry
from common.signing import load_private_key
from server.registry_http import RegistryServerHandle, create_app, start_registry_server
from tests.limits import SOCKET_S
from tests.tls_helpers import REFUSED, https_get, tls_context


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    return init_federation(tmp_path_factory.mktemp("certs"), [], [])


@pytest.fixture(scope="module")
def hospital(fed: FederationPaths) -> HospitalPaths:
    return init_hospital("hospital-a", fed.out / "hospitals", fed.out)


@pytest.fixture(scope="module")
def registry_root(fed: FederationPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v0 (score 0.5), v1 (0.9, best), v2 (0.7, latest)."""
    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root, load_private_key(fed.signing_key))
    for version, score in enumerate([0.5, 0.9, 0.7]):
        head = {"weight": torch.full((2, 3), float(version))}
        registry.publish(version, {"w": torch.zeros(3)}, head,
                         {"version": version, "round": version}, score, "auc")
    return root


@pytest.fixture(scope="module")
def client(registry_root: Path) -> TestClient:
    return TestClient(create_app(registry_root))


@pytest.fixture(scope="module")
def server(registry_root: Path, fed: FederationPaths) -> Iterator[RegistryServerHandle]:
    handle = start_registry_server(
        registry_root, "127.0.0.1", 0, fed.server_cert, fed.server_key, fed.ca_cert
    )
    yield handle
    handle.stop()


# ---------------------------------------------------------------------------- endpoints


def test_versions_lists_versions_and_pointers(client: TestClient) -> None:
    response = client.get("/v1/versions")
    assert response.status_code == 200
    assert response.json() == {"versions": [0, 1, 2], "latest": 2, "best": 1}


def test_versions_of_an_empty_registry(tmp_path: Path) -> None:
    response = TestClient(create_app(tmp_path / "none")).get("/v1/versions")
    assert response.json() == {"versions": [], "latest": None, "best": None}


@pytest.mark.parametrize("spec, version", [("latest", 2), ("best", 1), ("0", 0)])
def test_manifest_is_the_exact_bytes_of_the_version(
    client: TestClient, registry_root: Path, spec: str, version: int
) -> None:
    response = client.get(f"/v1/models/{spec}/manifest")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == (registry_root / f"v{version:04d}" / "manifest.json").read_bytes()


def test_weight_file_is_served_byte_for_byte(client: TestClient, registry_root: Path) -> None:
    response = client.get("/v1/models/best/files/head.safetensors")
    assert response.status_code == 200
    assert response.content == (registry_root / "v0001" / "head.safetensors").read_bytes()


@pytest.mark.parametrize("spec", ["7", "latest2", "v0001", "-1"])
def test_unknown_version_is_404_with_one_sentence(client: TestClient, spec: str) -> None:
    response = client.get(f"/v1/models/{spec}/manifest")
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert spec in detail
    assert "/" not in detail  # no server path leaks to the client


@pytest.mark.parametrize(
    "name", ["latest.json", "..%2Flatest.json", "..%2F..%2Fsigning.key", "x.safetensors"]
)
def test_only_the_four_bundle_files_are_served(client: TestClient, name: str) -> None:
    response = client.get(f"/v1/models/latest/files/{name}")
    assert response.status_code == 404
    assert b'"version"' not in response.content
    assert b"PRIVATE KEY" not in response.content


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------- mutual TLS


def test_federation_client_certificate_gets_in(
    server: RegistryServerHandle, hospital: HospitalPaths
) -> None:
    context = tls_context(hospital.ca_cert, hospital.client_cert, hospital.client_key)
    status, body = https_get(server.port, context, "/v1/versions")
    assert (status, json.loads(body)["latest"]) == (200, 2)


def test_client_without_certificate_is_refused(
    server: RegistryServerHandle, hospital: HospitalPaths
) -> None:
    with pytest.raises(REFUSED):
        https_get(server.port, tls_context(hospital.ca_cert), "/v1/versions")


def test_client_certificate_of_another_ca_is_refused(
    server: RegistryServerHandle, hospital: HospitalPaths, tmp_path: Path
) -> None:
    other = init_federation(tmp_path / "other", [], [])
    stranger = init_hospital("hospital-a", tmp_path / "other-hospitals", other.out)
    context = tls_context(hospital.ca_cert, stranger.client_cert, stranger.client_key)
    with pytest.raises(REFUSED):
        https_get(server.port, context, "/v1/versions")


def test_server_certificate_is_not_accepted_as_a_client_certificate(
    server: RegistryServerHandle, fed: FederationPaths
) -> None:
    # Signed by the right CA but marked serverAuth only: OpenSSL checks the purpose.
    context = tls_context(fed.ca_cert, fed.server_cert, fed.server_key)
    with pytest.raises(REFUSED):
        https_get(server.port, context, "/v1/versions")


def test_only_hospitals_of_the_hospitals_file_get_in_under_medfed_server(
    registry_root: Path, fed: FederationPaths, hospital: HospitalPaths, tmp_path: Path
) -> None:
    """A hospital taken off the hospitals file keeps a valid certificate of the federation's
    CA; it used to keep pulling every new model and reading the console."""
    from client.pull import PullError, pull_from_server

    removed = init_hospital("hospital-b", fed.out / "hospitals", fed.out)
    console = create_app(registry_root)  # any app mounted beside the registry
    handle = start_registry_server(registry_root, "127.0.0.1", 0, fed.server_cert,
                                   fed.server_key, fed.ca_cert, mounts={"/console": console},
                                   enrolled=frozenset({"hospital-a"}))
    enrolled = tls_context(hospital.ca_cert, hospital.client_cert, hospital.client_key)
    gone = tls_context(removed.ca_cert, removed.client_cert, removed.client_key)
    try:
        for path in ("/v1/versions", "/console/v1/versions"):
            assert https_get(handle.port, enrolled, path)[0] == 200, path
            status, body = https_get(handle.port, gone, path)
            assert status == 403, path
            assert json.loads(body)["detail"].startswith(
                "this client certificate is for 'hospital-b', which is not enrolled in this "
                "federation"), body
        with pytest.raises(PullError, match="HTTP 403 .*'hospital-b', which is not enrolled"):
            pull_from_server(f"127.0.0.1:{handle.port}", removed.out, "latest",
                             tmp_path / "pulled")
        assert not (tmp_path / "pulled").exists()
    finally:
        handle.stop()


def test_start_with_missing_certificate_names_it(
    registry_root: Path, fed: FederationPaths, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(CertError, match="nope.pem"):
        start_registry_server(registry_root, "127.0.0.1", 0, missing, fed.server_key, fed.ca_cert)


def test_start_with_a_key_of_another_certificate_is_refused(
    registry_root: Path, fed: FederationPaths, hospital: HospitalPaths
) -> None:
    with pytest.raises(CertError, match="unusable"):
        start_registry_server(
            registry_root, "127.0.0.1", 0, fed.server_cert, hospital.client_key, fed.ca_cert
        )


def test_stop_frees_the_port(registry_root: Path, fed: FederationPaths) -> None:
    handle = start_registry_server(
        registry_root, "127.0.0.1", 0, fed.server_cert, fed.server_key, fed.ca_cert
    )
    handle.stop()
    assert not handle.thread.is_alive()
    again = start_registry_server(
        registry_root, "127.0.0.1", handle.port, fed.server_cert, fed.server_key, fed.ca_cert
    )
    again.stop()


# ---------------------------------------------------------------------------- hygiene


def test_a_trailing_newline_in_a_version_is_a_404_not_a_500(client: TestClient) -> None:
    for path in ("/v1/models/latest%0A/manifest", "/v1/models/1%0A/files/head.safetensors"):
        response = client.get(path)
        assert response.status_code == 404, path


def test_a_symlink_in_the_registry_is_never_served(tmp_path: Path, fed: FederationPaths) -> None:
    root = tmp_path / "registry"
    registry = Registry(root, load_private_key(fed.signing_key))
    registry.publish(0, {"w": torch.zeros(3)}, {"h": torch.zeros(2)}, {"version": 0, "round": 0},
                     0.5, "auc")
    secret = tmp_path / "secret.txt"
    secret.write_text("the server's private notes")
    head = registry.version_dir(0) / "head.safetensors"
    head.unlink()
    head.symlink_to(secret)  # a file link inside a version ...
    (root / "v0001").symlink_to(registry.version_dir(0))  # ... and a whole linked version
    app = TestClient(create_app(root))
    assert app.get("/v1/models/0/files/head.safetensors").status_code == 404
    assert app.get("/v1/models/1/files/manifest.json").status_code == 404
    assert app.get("/v1/versions").json()["versions"] == [0]
    assert b"private notes" not in app.get("/v1/models/0/files/head.safetensors").content


@pytest.mark.parametrize("sends", [b"", b"GET /v1/versions HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half a request head"])
def test_a_connection_that_never_completes_a_request_is_closed(
        server: RegistryServerHandle, hospital: HospitalPaths, monkeypatch: pytest.MonkeyPatch,
        sends: bytes) -> None:
    """uvicorn times a connection out only after a response: 64 hospitals' connections that
    sent nothing (or dripped a head) held every other one out with 503s. Now each must send a
    whole request head within REQUEST_HEAD_S; a request on time is still answered."""
    import socket

    import server.registry_http as registry_http

    monkeypatch.setattr(registry_http, "REQUEST_HEAD_S", 0.5)
    context = tls_context(hospital.ca_cert, hospital.client_cert, hospital.client_key)
    with socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_S) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(sends)
        assert sock.recv(1) == b""  # closed by the server (SOCKET_S: a busy machine is slow)
    assert https_get(server.port, context, "/v1/versions")[0] == 200


def test_a_version_in_other_digits_is_no_version(client: TestClient) -> None:
    """Python's \\d also matches Arabic-Indic digits, which int() reads as a number."""
    assert client.get("/v1/models/%D9%A1/manifest").status_code == 404


def test_an_idle_tls_handshake_is_dropped(server: RegistryServerHandle) -> None:
    """A connection that never sends a ClientHello is closed by the server after
    HANDSHAKE_TIMEOUT_S (5 s), not held for asyncio's default 60 s."""
    import socket

    from server.registry_http import HANDSHAKE_TIMEOUT_S

    with socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_S) as sock:
        sock.settimeout(HANDSHAKE_TIMEOUT_S * 6)  # generous: a busy machine is slow
        assert sock.recv(1) == b""  # closed by the server, well before 60 s
