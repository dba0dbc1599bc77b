"""Ed25519 keys and signatures for model bundles.

The server signs each bundle's ``manifest.json`` with its private key; hospitals verify with
the public key (``<key>.pub``) before using a model. Keys are PEM files: the private key as
unencrypted PKCS#8 readable by its owner only (``0600``), the public key as SubjectPublicKeyInfo.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.atomic import atomic_write_bytes

SIGNATURE_BYTES = 64  # an Ed25519 signature is always 64 bytes


class SignatureError(ValueError):
    """A key file is unusable or a signature does not verify; the message names the file."""


def public_key_path(private_key_path: Path) -> Path:
    """Return where the public key of ``private_key_path`` lives.

    ``signing.key`` -> ``signing.pub`` (the name ``medfed certs init`` gives hospitals);
    any other name gets ``.pub`` appended.
    """
    private_key_path = Path(private_key_path)
    if private_key_path.suffix == ".key":
        return private_key_path.with_suffix(".pub")
    return private_key_path.with_name(private_key_path.name + ".pub")


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_pem(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise SignatureError(f"{kind} key file {path} does not exist") from err
    except OSError as err:
        raise SignatureError(f"{kind} key file {path} cannot be read: {err.strerror}") from err


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted PEM PKCS#8 Ed25519 private key readable by its owner only.

    Raises
    ------
    SignatureError
        If the file is missing, is readable by group or others, or is not an Ed25519 key.
    """
    path = Path(path)
    data = _read_key_file(path, "private")
    perms = stat.S_IMODE(os.stat(path).st_mode)
    if os.name == "posix" and perms & 0o077:
        raise SignatureError(
            f"private key {path} has permissions {perms:04o}; expected 0600 (chmod 600 {path})"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        # TypeError: the key is password-protected; ValueError: not PEM / corrupt.
        raise SignatureError(
            f"private key {path} is not an unencrypted PEM PKCS#8 key: {err}"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"private key {path} is a {type(key).__name__}; expected an Ed25519 private key"
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM SubjectPublicKeyInfo Ed25519 public key.

    Raises
    ------
    SignatureError
        If the file is missing or does not hold an Ed25519 public key.
    """
    path = Path(path)
    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SignatureError(f"public key {path} is not a PEM public key: {err}") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"public key {path} is a {type(key).__name__}; expected an Ed25519 public key"
        )
    return key


def load_or_create_signing_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """Load the signing key at ``path``, or create it (and ``<path>.pub``) if absent.

    Parameters
    ----------
    path:
        Private key file. A new key is written with mode ``0600``, its public key next to it
        as ``<path>.pub`` with mode ``0644``; both writes are atomic.

    Returns
    -------
    tuple[Ed25519PrivateKey, bool]
        The key and whether it was created by this call.

    Raises
    ------
    SignatureError
        If an existing key is unusable (see :func:`load_private_key`) or an existing
        ``<path>.pub`` belongs to a different key.
    """
    path = Path(path)
    pub_path = public_key_path(path)
    if path.exists():
        key = load_private_key(path)
        if not pub_path.exists():
            atomic_write_bytes(pub_path, _public_pem(key.public_key()), mode=0o644)
        elif load_public_key(pub_path).public_bytes_raw() != key.public_key().public_bytes_raw():
            raise SignatureError(
                f"public key {pub_path} does not belong to private key {path}; expected the "
                f"matching key (delete {pub_path} to regenerate it)"
            )
        return key, False
    key = Ed25519PrivateKey.generate()
    # Private key first: a crash in between leaves a usable key whose .pub is rewritten next time.
    atomic_write_bytes(path, _private_pem(key), mode=0o600)
    atomic_write_bytes(pub_path, _public_pem(key.public_key()), mode=0o644)
    return key, True


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """Return the 64-byte Ed25519 signature of ``data``."""
    return key.sign(data)


def verify(pub: Ed25519PublicKey, data: bytes, sig: bytes, where: str) -> None:
    """Check that ``sig`` is ``pub``'s signature of ``data``.

    Parameters
    ----------
    where:
        What was signed (a file path), used in the error message.

    Raises
    ------
    SignatureError
        If the signature does not verify (data changed, or signed by another key).
    """
    try:
        pub.verify(sig, data)
    except InvalidSignature as err:
        raise SignatureError(
            f"signature check failed for {where}: expected a valid signature by key "
            f"{public_key_fingerprint(pub)[:16]}, found a signature that does not match "
            f"(the file was modified or signed by a different key)"
        ) from err


def public_key_fingerprint(pub: Ed25519PublicKey) -> str:
    """Return the sha256 hex digest of the raw 32 public key bytes (for logs and manifests)."""
    return hashlib.sha256(pub.public_bytes_raw()).hexdigest()
