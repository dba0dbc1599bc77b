"""Tests for client/pull.py: pulls over real mutual TLS and from a registry directory."""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import client.pull
from client.pull import PullError, parse_address, pull_from_registry, pull_from_server
from common.bundle import BundleError, BundleSignatureError
from common.certs import FederationPaths, HospitalPaths, init_federation, init_hospital
from common.registry import Registry
from common.signing import load_or_create_signing_key, load_private_key, public_key_path
from medfed.cli import main
from server.registry_http import RegistryServerHandle, start_registry_server
from tests.limits import SOCKET_S

TIMEOUT = SOCKET_S
BUNDLE_FILES = ("manifest.json", "manifest.sig", "backbone.safetensors", "head.safetensors")


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    return init_federation(tmp_path_factory.mktemp("certs"), [], [])


@pytest.fixture(scope="module")
def hospital(fed: FederationPaths) -> HospitalPaths:
    return init_hospital("hospital-a", fed.out / "hospitals", fed.out)


def _build_registry(root: Path, fed: FederationPaths) -> Path:
    """v0 (score 0.5), v1 (0.9, best), v2 (0.7, latest); heads differ per version."""
    registry = Registry(root, load_private_key(fed.signing_key))
    for version, score in enumerate([0.5, 0.9, 0.7]):
        head = {"weight": torch.full((2, 3), float(version))}
        registry.publish(version, {"w": torch.zeros(3)}, head,
                         {"version": version, "round": version}, score, "auc")
    return root


@pytest.fixture(scope="module")
def registry_root(fed: FederationPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_registry(tmp_path_factory.mktemp("registry"), fed)


@pytest.fixture
def start(fed: FederationPaths) -> Iterator[Callable[[Path], RegistryServerHandle]]:
    """Start a registry server on a free port; every server is stopped at teardown."""
    handles: list[RegistryServerHandle] = []

    def _start(root: Path) -> RegistryServerHandle:
        handle = start_registry_server(
            root, "127.0.0.1", 0, fed.server_cert, fed.server_key, fed.ca_cert
        )
        handles.append(handle)
        return handle

    yield _start
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="module")
def server(registry_root: Path, fed: FederationPaths) -> Iterator[RegistryServerHandle]:
    handle = start_registry_server(
        registry_root, "127.0.0.1", 0, fed.server_cert, fed.server_key, fed.ca_cert
    )
    yield handle
    handle.stop()


Handler = Callable[[ssl.SSLSocket, str], None]


@pytest.fixture
def hostile(fed: FederationPaths) -> Iterator[Callable[[Handler], str]]:
    """A raw TLS server with the federation's real server certificate that answers each
    request with `handler(connection, path)`; its address."""
    listeners: list[socket.socket] = []

    def _start(handler: Handler) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(fed.server_cert), str(fed.server_key))
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def serve(conn: socket.socket) -> None:
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    request = tls.makefile("rb")
                    path = request.readline().split()[1].decode()
                    while request.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    handler(tls, path)
            except (OSError, IndexError):
                pass  # the client gave up: that is what these tests wait for

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # closed at teardown
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    yield _start
    for listener in listeners:
        listener.close()


def _same_files(out: Path, version_dir: Path) -> bool:
    return sorted(p.name for p in out.iterdir()) == sorted(BUNDLE_FILES) and all(
        (out / name).read_bytes() == (version_dir / name).read_bytes() for name in BUNDLE_FILES
    )


def _nothing_written(out: Path) -> bool:
    # Neither `out` nor a leftover temporary directory next to it.
    return not out.exists() and list(out.parent.glob(f".{out.name}*")) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _certs_with(tmp: Path, hospital: HospitalPaths, **replace: Path) -> Path:
    """A copy of the hospital folder with some files swapped for others."""
    folder = tmp / "swapped"
    shutil.copytree(hospital.out, folder)
    for name, source in replace.items():
        shutil.copy2(source, folder / name)
    return folder


# ---------------------------------------------------------------------------- over mTLS


@pytest.mark.parametrize("spec, version", [("latest", 2), ("best", 1), ("0", 0)])
def test_pull_over_mtls_copies_the_version_byte_for_byte(
    server: RegistryServerHandle, hospital: HospitalPaths, registry_root: Path,
    tmp_path: Path, spec: str, version: int,
) -> None:
    out = tmp_path / "model"
    manifest = pull_from_server(server.address, hospital.out, spec, out, timeout=TIMEOUT)
    assert manifest["version"] == version
    assert _same_files(out, registry_root / f"v{version:04d}")


def test_client_certificate_of_another_ca_is_refused_and_nothing_written(
    server: RegistryServerHandle, hospital: HospitalPaths, tmp_path: Path
) -> None:
    other = init_federation(tmp_path / "other", [], [])
    stranger = init_hospital("hospital-a", tmp_path / "other-hospitals", other.out)
    certs = _certs_with(tmp_path, hospital, **{
        "client.pem": stranger.client_cert, "client.key": stranger.client_key,
    })
    out = tmp_path / "model"
    with pytest.raises(PullError, match="refused our client certificate|closed the connection"):
        pull_from_server(server.address, certs, "latest", out, timeout=TIMEOUT)
    assert _nothing_written(out)


def test_server_not_signed_by_our_ca_is_not_trusted(
    server: RegistryServerHandle, tmp_path: Path
) -> None:
    other = init_federation(tmp_path / "other", [], [])
    stranger = init_hospital("hospital-a", tmp_path / "other-hospitals", other.out)
    out = tmp_path / "model"
    with pytest.raises(PullError, match="not trusted by the federation CA"):
        pull_from_server(server.address, stranger.out, "latest", out, timeout=TIMEOUT)
    assert _nothing_written(out)


def test_tampered_file_on_the_server_fails_naming_it(
    start: Callable[[Path], RegistryServerHandle], fed: FederationPaths,
    hospital: HospitalPaths, tmp_path: Path,
) -> None:
    root = _build_registry(tmp_path / "registry", fed)
    head = root / "v0002" / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0x01
    head.write_bytes(bytes(data))
    handle = start(root)
    out = tmp_path / "model"
    with pytest.raises(BundleError, match=r"model v0002 .*head\.safetensors has sha256"):
        pull_from_server(handle.address, hospital.out, "latest", out, timeout=TIMEOUT)
    assert _nothing_written(out)


def test_wrong_public_key_is_a_signature_error_and_nothing_written(
    server: RegistryServerHandle, hospital: HospitalPaths, tmp_path: Path
) -> None:
    load_or_create_signing_key(tmp_path / "other.key")
    out = tmp_path / "model"
    with pytest.raises(BundleSignatureError, match="manifest.json"):
        pull_from_server(server.address, hospital.out, "latest", out,
                         public_key_path(tmp_path / "other.key"), timeout=TIMEOUT)
    assert _nothing_written(out)


def test_unknown_version_is_one_sentence_404(
    server: RegistryServerHandle, hospital: HospitalPaths, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    with pytest.raises(PullError, match="has no model version 7$"):
        pull_from_server(server.address, hospital.out, "7", out, timeout=TIMEOUT)
    assert _nothing_written(out)


def test_empty_registry_has_no_latest_yet(
    start: Callable[[Path], RegistryServerHandle], hospital: HospitalPaths, tmp_path: Path
) -> None:
    handle = start(tmp_path / "empty")
    with pytest.raises(PullError, match="no 'latest' version yet"):
        pull_from_server(handle.address, hospital.out, "latest", tmp_path / "m", timeout=TIMEOUT)


def test_unreachable_registry_says_connection_refused(
    hospital: HospitalPaths, tmp_path: Path
) -> None:
    port = _free_port()
    out = tmp_path / "model"
    expected = f"cannot reach the model registry at 127.0.0.1:{port} (connection refused)"
    with pytest.raises(PullError) as info:
        pull_from_server(f"127.0.0.1:{port}", hospital.out, "latest", out, timeout=TIMEOUT)
    assert str(info.value) == expected
    assert _nothing_written(out)


def test_missing_client_key_is_named_before_connecting(
    hospital: HospitalPaths, tmp_path: Path
) -> None:
    certs = _certs_with(tmp_path, hospital)
    (certs / "client.key").unlink()
    with pytest.raises(PullError, match=r"client key .*client\.key is missing"):
        pull_from_server("127.0.0.1:1", certs, "latest", tmp_path / "m", timeout=TIMEOUT)


def test_missing_certs_folder_argument_is_refused(hospital: HospitalPaths, tmp_path: Path) -> None:
    with pytest.raises(PullError, match="--certs is required"):
        pull_from_server("127.0.0.1:1", None, "latest", tmp_path / "m",
                         hospital.signing_pub, timeout=TIMEOUT)


def test_existing_output_is_left_alone(
    server: RegistryServerHandle, hospital: HospitalPaths, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PullError, match="already exists"):
        pull_from_server(server.address, hospital.out, "latest", out, timeout=TIMEOUT)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_replace_swaps_in_the_new_version(
    server: RegistryServerHandle, hospital: HospitalPaths, registry_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    pull_from_server(server.address, hospital.out, "0", out, timeout=TIMEOUT)
    pull_from_server(server.address, hospital.out, "latest", out, replace=True, timeout=TIMEOUT)
    assert _same_files(out, registry_root / "v0002")


def test_an_oversized_versions_answer_is_refused_without_reading_it_all(
    hostile: Callable[[Handler], str], hospital: HospitalPaths, tmp_path: Path
) -> None:
    """/v1/versions is a small JSON answer: once read with the 8 GiB weight-file cap."""
    def huge(conn: ssl.SSLSocket, path: str) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        conn.sendall(b" " * (2 << 20) + b'{"latest": null, "best": null, "versions": []}')

    address = hostile(huge)
    out = tmp_path / "model"
    with pytest.raises(PullError, match=rf"/v1/versions from {address} is larger than"):
        pull_from_server(address, hospital.out, "latest", out, timeout=TIMEOUT)
    assert _nothing_written(out)


def test_a_registry_that_drips_its_answer_is_given_up_at_the_deadline(
    hostile: Callable[[Handler], str], hospital: HospitalPaths, tmp_path: Path
) -> None:
    """A byte every 0.05 s never trips the per-operation timeout; the whole-request deadline
    ends it. (The server stops after TIMEOUT, so a pull without one fails otherwise.)"""
    def drip(conn: ssl.SSLSocket, path: str) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")  # no length: the body ends when it closes
        end = time.monotonic() + TIMEOUT
        while time.monotonic() < end:
            conn.sendall(b" ")
            time.sleep(0.05)

    address = hostile(drip)
    out = tmp_path / "model"
    with pytest.raises(PullError, match=rf"registry at {address} did not finish sending "
                                        r"/v1/versions within 0.5 s"):
        pull_from_server(address, hospital.out, "latest", out, timeout=TIMEOUT, deadline=0.5)
    assert _nothing_written(out)


def test_a_local_write_error_names_this_machine_not_the_registry(
    server: RegistryServerHandle, hospital: HospitalPaths, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full disk while saving a weight file was reported as 'cannot reach the registry'."""
    def full_disk(path: Path, mode: str, **kwargs: object) -> object:
        return open("/dev/full", mode, **kwargs)  # every write: ENOSPC, as on a full disk

    monkeypatch.setattr(client.pull, "open", full_disk, raising=False)
    out = tmp_path / "model"
    with pytest.raises(PullError) as info:
        pull_from_server(server.address, hospital.out, "latest", out, timeout=TIMEOUT)
    message = str(info.value)
    assert message.startswith(f"cannot write backbone.safetensors to the local directory "
                              f"{tmp_path} (No space left on device)"), message
    assert "cannot reach" not in message
    assert _nothing_written(out)


def test_pull_from_server_with_unsigned_does_not_claim_the_signature_was_skipped(
    server: RegistryServerHandle, hospital: HospitalPaths, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--unsigned is for --registry only: a pull from a server checks the signature anyway."""
    out = tmp_path / "model"
    code = main(["pull", "--server", server.address, "--certs", str(hospital.out),
                 "--version", "0", "--out", str(out), "--unsigned"])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith("hashes and signature verified")


@pytest.mark.parametrize(
    "text, expected",
    [("fl.example.org:8443", ("fl.example.org", 8443)), ("10.0.0.1", ("10.0.0.1", 8443)),
     ("[::1]:9000", ("::1", 9000))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["host:0", "host:http", "::1:80", ":80", "[::1",
                                  "https://host:8443", "a host:8443"])
def test_parse_address_refuses_malformed(text: str) -> None:
    with pytest.raises(PullError, match="--server"):
        parse_address(text)


# ---------------------------------------------------------------------------- from a directory


def test_pull_from_registry_round_trip(
    registry_root: Path, hospital: HospitalPaths, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    manifest = pull_from_registry(registry_root, "best", out, hospital.signing_pub)
    assert manifest["version"] == 1
    assert _same_files(out, registry_root / "v0001")


def test_pull_from_registry_refuses_wrong_key_and_writes_nothing(
    registry_root: Path, tmp_path: Path
) -> None:
    load_or_create_signing_key(tmp_path / "other.key")
    out = tmp_path / "model"
    with pytest.raises(BundleSignatureError):
        pull_from_registry(registry_root, "latest", out, public_key_path(tmp_path / "other.key"))
    assert _nothing_written(out)


def test_pull_from_registry_refuses_tampered_head(
    fed: FederationPaths, hospital: HospitalPaths, tmp_path: Path
) -> None:
    root = _build_registry(tmp_path / "registry", fed)
    head = root / "v0001" / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + b"\x00")
    out = tmp_path / "model"
    with pytest.raises(BundleError, match=r"head\.safetensors has sha256"):
        pull_from_registry(root, "best", out, hospital.signing_pub)
    assert _nothing_written(out)


def test_pull_from_registry_unknown_version(registry_root: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="has no version 9"):
        pull_from_registry(registry_root, "9", tmp_path / "model", None)


def test_pull_from_missing_registry_directory(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="registry directory .* does not exist"):
        pull_from_registry(tmp_path / "nope", "latest", tmp_path / "model", None)


def test_malformed_version_is_refused(registry_root: Path, tmp_path: Path) -> None:
    with pytest.raises(PullError, match="--version must be"):
        pull_from_registry(registry_root, "newest", tmp_path / "model", None)


# ---------------------------------------------------------------------------- forged models


@pytest.fixture
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hospital's MEDFED_HOME of its own: it remembers what it pulled (rollbacks)."""
    home = tmp_path / "home"
    monkeypatch.setenv("MEDFED_HOME", str(home))
    return home


def test_a_registry_serving_an_older_model_as_latest_is_refused(
        own_home, fed, hospital, start, tmp_path) -> None:
    root = _build_registry(tmp_path / "registry", fed)
    server = start(root)
    assert pull_from_server(server.address, hospital.out, "latest", tmp_path / "a")["version"] == 2
    (root / "latest.json").write_text('{"version": 1}\n')  # the registry rolls back
    with pytest.raises(BundleError, match="refused as a rollback"):
        pull_from_server(server.address, hospital.out, "latest", tmp_path / "b")
    assert _nothing_written(tmp_path / "b")
    # going back on purpose, by number, is allowed
    assert pull_from_server(server.address, hospital.out, "1", tmp_path / "c")["version"] == 1


def test_a_registry_directory_whose_latest_moves_back_is_refused(
        own_home, fed, hospital, tmp_path) -> None:
    """The same rollback protection as from a server, per registry directory."""
    root = _build_registry(tmp_path / "registry", fed)
    assert pull_from_registry(root, "latest", tmp_path / "a", hospital.signing_pub)["version"] == 2
    (root / "latest.json").write_text('{"version": 1}\n')  # the registry rolls back
    with pytest.raises(BundleError, match="refused as a rollback"):
        pull_from_registry(root, "latest", tmp_path / "b", hospital.signing_pub)
    assert _nothing_written(tmp_path / "b")
    # another registry directory has its own history; going back by number is allowed
    other = _build_registry(tmp_path / "other", fed)
    (other / "latest.json").write_text('{"version": 1}\n')
    assert pull_from_registry(other, "latest", tmp_path / "c", hospital.signing_pub)["version"] == 1
    assert pull_from_registry(root, "1", tmp_path / "d", hospital.signing_pub)["version"] == 1


def test_a_version_that_signs_another_number_is_refused(own_home, fed, hospital, start,
                                                       tmp_path) -> None:
    root = _build_registry(tmp_path / "registry", fed)
    shutil.rmtree(root / "v0002")
    shutil.copytree(root / "v0000", root / "v0002")  # v0's signed bundle served as v2
    server = start(root)
    with pytest.raises(BundleError, match="signed manifest is of version 0, not 2"):
        pull_from_server(server.address, hospital.out, "2", tmp_path / "out")
    assert _nothing_written(tmp_path / "out")


def test_the_signature_is_checked_before_any_weight_is_downloaded(own_home, fed, hospital, start,
                                                                   tmp_path) -> None:
    root = _build_registry(tmp_path / "registry", fed)
    # a forged manifest, and no weights at all: a pull that downloaded first would fail on
    # the missing file; one that verifies first names the signature
    manifest = root / "v0002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"round": 2', b'"round": 9'))
    (root / "v0002" / "head.safetensors").unlink()
    server = start(root)
    with pytest.raises(BundleSignatureError, match="manifest.json"):
        pull_from_server(server.address, hospital.out, "2", tmp_path / "out")
    assert _nothing_written(tmp_path / "out")


def test_a_weight_file_larger_than_its_signed_size_is_refused(own_home, fed, hospital, start,
                                                             tmp_path) -> None:
    root = _build_registry(tmp_path / "registry", fed)
    head = root / "v0002" / "head.safetensors"
    head.write_bytes(head.read_bytes() + bytes(1 << 20))  # a MB more than the manifest says
    server = start(root)
    with pytest.raises(BundleError, match="exceeds the .* bytes its signed manifest allows"):
        pull_from_server(server.address, hospital.out, "2", tmp_path / "out")
    assert _nothing_written(tmp_path / "out")
