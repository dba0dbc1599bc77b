"""Tests for common.signing: Ed25519 key files, signatures and fingerprints."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.signing import (
    SignatureError,
    load_or_create_signing_key,
    load_private_key,
    load_public_key,
    public_key_fingerprint,
    sign,
    verify,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def test_create_writes_private_key_0600_and_public_key_0644(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "server.key"

    key, created = load_or_create_signing_key(path)

    assert created is True
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "keys" / "server.pub") == 0o644
    pub = load_public_key(tmp_path / "keys" / "server.pub")
    assert pub.public_bytes_raw() == key.public_key().public_bytes_raw()


def test_second_call_loads_the_same_key_without_creating(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    first, _ = load_or_create_signing_key(path)

    second, created = load_or_create_signing_key(path)

    assert created is False
    assert _raw_private(second) == _raw_private(first)


def test_second_call_restores_a_deleted_public_key(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    key, _ = load_or_create_signing_key(path)
    (tmp_path / "server.pub").unlink()

    load_or_create_signing_key(path)

    pub = load_public_key(tmp_path / "server.pub")
    assert pub.public_bytes_raw() == key.public_key().public_bytes_raw()


def test_mismatched_public_key_file_is_refused(tmp_path: Path) -> None:
    load_or_create_signing_key(tmp_path / "a.key")
    load_or_create_signing_key(tmp_path / "b.key")
    os.replace(tmp_path / "b.pub", tmp_path / "a.pub")

    with pytest.raises(SignatureError, match=r"a\.pub does not belong"):
        load_or_create_signing_key(tmp_path / "a.key")


def test_private_key_with_loose_permissions_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    load_or_create_signing_key(path)
    os.chmod(path, 0o644)

    with pytest.raises(SignatureError) as info:
        load_private_key(path)

    assert "has permissions 0644; expected 0600" in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)


def test_load_or_create_refuses_loose_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    load_or_create_signing_key(path)
    os.chmod(path, 0o640)

    with pytest.raises(SignatureError, match="0640"):
        load_or_create_signing_key(path)


def test_private_key_file_with_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)

    with pytest.raises(SignatureError, match="server.key is not an unencrypted PEM"):
        load_private_key(path)


def test_private_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)

    with pytest.raises(SignatureError, match="expected an Ed25519 private key"):
        load_private_key(path)


def test_public_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.pub"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    with pytest.raises(SignatureError, match=r"ec\.pub is a .*; expected an Ed25519 public key"):
        load_public_key(path)


def test_missing_public_key_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match=r"nowhere\.pub does not exist"):
        load_public_key(tmp_path / "nowhere.pub")


def test_verify_accepts_a_matching_signature() -> None:
    key = Ed25519PrivateKey.generate()

    verify(key.public_key(), b"manifest", sign(key, b"manifest"), where="m.json")


def test_verify_refuses_changed_data_naming_where() -> None:
    key = Ed25519PrivateKey.generate()
    sig = sign(key, b"manifest")

    with pytest.raises(SignatureError, match="signature check failed for m.json"):
        verify(key.public_key(), b"manifesT", sig, where="m.json")


def test_verify_refuses_another_key() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()

    with pytest.raises(SignatureError, match="m.json"):
        verify(other.public_key(), b"manifest", sign(key, b"manifest"), where="m.json")


def test_verify_refuses_a_truncated_signature() -> None:
    key = Ed25519PrivateKey.generate()

    with pytest.raises(SignatureError, match="m.json"):
        verify(key.public_key(), b"manifest", sign(key, b"manifest")[:63], where="m.json")


def test_fingerprint_is_sha256_of_raw_public_bytes() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    assert public_key_fingerprint(key.public_key()) == hashlib.sha256(raw).hexdigest()
