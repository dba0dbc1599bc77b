"""Model bundle I/O: a signed directory of safetensors weights plus a JSON manifest.

A bundle directory holds ``backbone.safetensors``, ``head.safetensors``, ``manifest.json``
(free-form metadata plus the sha256 of every weights file) and ``manifest.sig`` (Ed25519
signature of the exact ``manifest.json`` bytes). Loading checks, in order: the signature (when
a public key is given), the manifest, the sha256 of every listed file, and only then builds
tensors, so a tampered file never reaches the safetensors parser. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors import torch as st  # safetensors' parser (no pickle)

from common.atomic import atomic_dir, atomic_write_bytes
from common.signing import SignatureError, public_key_fingerprint, sign, verify

BUNDLE_FORMAT = 1
BACKBONE_FILE = "backbone.safetensors"
HEAD_FILE = "head.safetensors"
SITE_STATS_FILE = "site_stats.json"  # a site model's own imputation/normalisation statistics
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
WEIGHT_FILES = (BACKBONE_FILE, HEAD_FILE)
_HASH_CHUNK = 1 << 20
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(ValueError):
    """A bundle is missing, malformed or fails a hash check; the message names the file."""


class BundleSignatureError(BundleError, SignatureError):
    """A bundle's manifest signature does not verify (catchable as either parent)."""


@dataclass(frozen=True)
class Bundle:
    """A verified, loaded bundle."""

    path: Path
    manifest: dict[str, Any]
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    # the verified bytes of every other listed file (a site model's site_stats.json): use
    # these, never the file again, which may have changed on disk since it was checked
    extras: dict[str, bytes] = field(default_factory=dict)


def sha256_bytes(b: bytes) -> str:
    """Return the sha256 hex digest of ``b``."""
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Serialise a state dict to safetensors bytes (CPU, contiguous, storage not shared)."""
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise BundleError(
                f"state entry {name!r} is a {type(value).__name__}; expected a str name "
                f"mapped to a torch.Tensor"
            )
    # A copy per tensor: safetensors refuses views that share storage (tied weights, slices).
    plain = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
    return safetensors.torch.save(plain)


def state_from_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a state dict.

    Raises
    ------
    BundleError
        Naming ``where`` if the bytes are not a valid safetensors file.
    """
    try:
        # Looked up at call time (not imported by name) so tests can intercept the parser.
        return st.load(data)
    except Exception as err:  # SafetensorError has no stable import path across versions
        raise BundleError(f"{where} is not a valid safetensors file: {err}") from err


def _non_json_key(value: Any, key: str) -> tuple[str, str] | None:
    """Return ``(key path, description)`` of the first value strict JSON cannot hold."""
    if value is None or isinstance(value, bool | str | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, repr(value))
    if isinstance(value, dict):
        for sub_key, sub_value in value.items():
            if not isinstance(sub_key, str):
                return (f"{key}.{sub_key!r}", f"a {type(sub_key).__name__} key")
            found = _non_json_key(sub_value, f"{key}.{sub_key}" if key else sub_key)
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _non_json_key(item, f"{key}[{index}]")
            if found:
                return found
        return None
    return (key, f"a {type(value).__name__}")


def manifest_to_bytes(manifest: dict[str, Any]) -> bytes:
    """Encode a manifest as strict, canonical JSON (sorted keys, 2-space indent).

    Raises
    ------
    BundleError
        Naming the key whose value JSON cannot represent (NaN, a tensor, a Path...).
    """
    found = _non_json_key(manifest, "")
    if found:
        key, what = found
        raise BundleError(
            f"manifest key {key!r} holds {what}; expected a JSON value (str, finite number, "
            f"bool, null, list or dict)"
        )
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_bundle(
    out_dir: Path,
    *,
    backbone: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    signing_key: Ed25519PrivateKey,
    replace: bool = False,
) -> dict[str, Any]:
    """Write a signed bundle atomically to ``out_dir``.

    Parameters
    ----------
    out_dir:
        Bundle directory to create; it appears complete or not at all.
    backbone, head:
        State dicts of the two model parts.
    manifest:
        Free-form JSON metadata (not modified). ``format``, ``files``, ``backbone_sha256``,
        ``signer`` and ``created`` are filled in here and override same-named keys.
    signing_key:
        Key that signs the exact ``manifest.json`` bytes.
    replace:
        Overwrite an existing ``out_dir`` (otherwise :class:`FileExistsError`).

    Returns
    -------
    dict[str, Any]
        The manifest as written.
    """
    payloads = {BACKBONE_FILE: state_to_bytes(backbone), HEAD_FILE: state_to_bytes(head)}
    files = {name: sha256_bytes(data) for name, data in payloads.items()}
    # Encode (and so validate) before touching the disk.
    manifest_bytes, signature = sign_manifest(
        manifest, files, signing_key, sizes={n: len(d) for n, d in payloads.items()})
    payloads[MANIFEST_FILE] = manifest_bytes
    payloads[SIGNATURE_FILE] = signature
    _write_files(Path(out_dir), payloads, replace=replace)
    # Return the parsed form (tuples become lists), i.e. exactly what a later load returns.
    written: dict[str, Any] = json.loads(manifest_bytes)
    return written


def sign_manifest(manifest: dict[str, Any], files: dict[str, str],
                  signing_key: Ed25519PrivateKey, sizes: dict[str, int] | None = None
                  ) -> tuple[bytes, bytes]:
    """Canonical manifest bytes listing `files` (name -> sha256), and their signature.

    The signer never needs the files themselves, only their hashes: a hospital's site model
    is signed from the hashes it reports, so its statistics never leave the site. `sizes`
    (name -> bytes), when known, let a downloader refuse an oversized file early.
    """
    for name, digest in files.items():
        if not _PLAIN_NAME.fullmatch(name) or name in (MANIFEST_FILE, SIGNATURE_FILE):
            raise BundleError(f"bundle file name {name!r} is not a plain file name")
        if not _SHA256.fullmatch(digest):
            raise BundleError(f"bundle file {name!r} has hash {digest[:80]!r}; expected 64 "
                              "lowercase hex characters")
    final = dict(manifest)
    if sizes is not None:
        final["sizes"] = dict(sizes)
    else:
        final.pop("sizes", None)
    final.update(
        format=BUNDLE_FORMAT,
        files=dict(files),
        backbone_sha256=files[BACKBONE_FILE],
        signer=public_key_fingerprint(signing_key.public_key()),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    manifest_bytes = manifest_to_bytes(final)
    return manifest_bytes, sign(signing_key, manifest_bytes)


def assemble_bundle(out_dir: Path, files: dict[str, bytes], manifest_bytes: bytes,
                    signature: bytes, public_key: Ed25519PublicKey | None, *,
                    replace: bool = False) -> dict[str, Any]:
    """Write a bundle from its parts, verified before it becomes visible; its manifest.

    The signature (with `public_key`) and every listed hash are checked inside the temporary
    directory, so a bundle that does not verify never appears at `out_dir`.
    """
    with atomic_dir(Path(out_dir), replace=replace) as tmp:
        for name, data in {**files, MANIFEST_FILE: manifest_bytes,
                           SIGNATURE_FILE: signature}.items():
            atomic_write_bytes(tmp / name, data, mode=0o644)
        manifest = read_manifest(tmp, public_key, require_signature=public_key is not None)
        extra = sorted(set(files) - set(manifest["files"]))
        if extra:
            raise BundleError(f"bundle file {extra[0]!r} is not listed in the signed manifest")
    return manifest


def _write_files(out_dir: Path, payloads: dict[str, bytes], *, replace: bool) -> None:
    with atomic_dir(out_dir, replace=replace) as tmp:
        for name, data in payloads.items():
            atomic_write_bytes(tmp / name, data, mode=0o644)


def _read(bundle_dir: Path, name: str) -> bytes:
    try:
        return (bundle_dir / name).read_bytes()
    except FileNotFoundError as err:
        raise BundleError(f"bundle {bundle_dir} is missing {name}") from err
    except OSError as err:
        raise BundleError(f"bundle {bundle_dir}: cannot read {name}: {err.strerror}") from err


def _parse_manifest(bundle_dir: Path, data: bytes) -> dict[str, Any]:
    """Parse and structurally check manifest bytes (after any signature check)."""
    where = f"bundle {bundle_dir}: {MANIFEST_FILE}"
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise BundleError(f"{where} holds a {type(manifest).__name__}; expected a JSON object")
    found_format = manifest.get("format")
    if found_format != BUNDLE_FORMAT:
        raise BundleError(
            f"{where} has format {found_format!r}; expected {BUNDLE_FORMAT} "
            f"(a newer format needs a newer medfed)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()
    ):
        raise BundleError(f"{where} key 'files' must map file names to sha256 hex strings")
    for name in files:
        # Plain names only: a manifest must not make us hash or copy files outside the bundle.
        if name in (MANIFEST_FILE, SIGNATURE_FILE) or not _PLAIN_NAME.fullmatch(name):
            raise BundleError(f"{where} key 'files' lists {name!r}; expected a plain file name")
    for name in WEIGHT_FILES:
        if name not in files:
            raise BundleError(f"{where} key 'files' lacks {name!r}; expected both weight files")
    if manifest.get("backbone_sha256", files[BACKBONE_FILE]) != files[BACKBONE_FILE]:
        raise BundleError(f"{where} key 'backbone_sha256' disagrees with files[{BACKBONE_FILE!r}]")
    return manifest


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and structurally check manifest bytes (verify the signature first)."""
    return _parse_manifest(Path(where), data)


def _load_manifest(
    bundle_dir: Path, public_key: Ed25519PublicKey | None, require_signature: bool
) -> tuple[dict[str, Any], bytes, bytes | None]:
    """Return (manifest, manifest bytes, signature bytes), verifying the signature first."""
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle {bundle_dir} does not exist or is not a directory")
    if require_signature and public_key is None:
        raise BundleError(
            f"bundle {bundle_dir}: a signature check is required but no public key was given"
        )
    manifest_bytes = _read(bundle_dir, MANIFEST_FILE)
    sig: bytes | None = None
    if public_key is not None:
        sig = _read(bundle_dir, SIGNATURE_FILE)
        try:
            verify(public_key, manifest_bytes, sig, where=f"bundle {bundle_dir}: {MANIFEST_FILE}")
        except SignatureError as err:
            raise BundleSignatureError(str(err)) from err
    elif (bundle_dir / SIGNATURE_FILE).exists():
        sig = _read(bundle_dir, SIGNATURE_FILE)
    return _parse_manifest(bundle_dir, manifest_bytes), manifest_bytes, sig


def _check_hash(bundle_dir: Path, name: str, expected: str, found: str) -> None:
    if found != expected:
        raise BundleError(
            f"bundle {bundle_dir}: {name} has sha256 {found[:16]}...; expected {expected[:16]}... "
            f"from {MANIFEST_FILE} (the file is corrupt or was modified)"
        )


def _read_verified_files(bundle_dir: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Read every listed file into memory and check its hash.

    Tensors are later built from these same bytes, so a file swapped on disk after the check
    cannot slip through.
    """
    contents: dict[str, bytes] = {}
    for name, expected in manifest["files"].items():
        data = _read(bundle_dir, name)
        _check_hash(bundle_dir, name, expected, sha256_bytes(data))
        contents[name] = data
    return contents


def read_manifest(
    bundle_dir: Path,
    public_key: Ed25519PublicKey | None = None,
    *,
    require_signature: bool = False,
) -> dict[str, Any]:
    """Verify a bundle and return its manifest without building any tensor.

    Checks the signature (when ``public_key`` is given), the manifest structure and the sha256
    of every file listed in ``manifest["files"]``.

    Raises
    ------
    BundleSignatureError
        If the signature does not verify (also a :class:`SignatureError`).
    BundleError
        If a file is missing, malformed or fails its hash check.
    """
    bundle_dir = Path(bundle_dir)
    manifest, _, _ = _load_manifest(bundle_dir, public_key, require_signature)
    for name, expected in manifest["files"].items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir} is missing {name}")
        _check_hash(bundle_dir, name, expected, sha256_file(path))
    return manifest


def load_bundle(
    bundle_dir: Path,
    public_key: Ed25519PublicKey | None = None,
    *,
    require_signature: bool = False,
) -> Bundle:
    """Verify and load a bundle.

    Parameters
    ----------
    bundle_dir:
        The bundle directory.
    public_key:
        Verify ``manifest.sig`` with this key (a missing signature is then an error).
    require_signature:
        Refuse to load when no ``public_key`` is given.

    Raises
    ------
    BundleSignatureError
        If the signature does not verify (also a :class:`SignatureError`).
    BundleError
        If a file is missing, malformed or fails its hash check; raised before any tensor
        is built.
    """
    bundle_dir = Path(bundle_dir)
    manifest, _, _ = _load_manifest(bundle_dir, public_key, require_signature)
    contents = _read_verified_files(bundle_dir, manifest)
    backbone = state_from_bytes(contents[BACKBONE_FILE], f"bundle {bundle_dir}: {BACKBONE_FILE}")
    head = state_from_bytes(contents[HEAD_FILE], f"bundle {bundle_dir}: {HEAD_FILE}")
    extras = {name: data for name, data in contents.items() if name not in WEIGHT_FILES}
    return Bundle(path=bundle_dir, manifest=manifest, backbone=backbone, head=head,
                  extras=extras)


def copy_bundle(
    src: Path,
    dst: Path,
    public_key: Ed25519PublicKey | None = None,
    *,
    replace: bool = False,
) -> dict[str, Any]:
    """Verify the bundle ``src`` and copy it atomically to ``dst``.

    The bytes written are exactly the bytes verified. ``manifest.sig`` is copied when present.

    Returns
    -------
    dict[str, Any]
        The verified manifest.

    Raises
    ------
    BundleError, BundleSignatureError
        As :func:`load_bundle`; nothing is written to ``dst`` then.
    FileExistsError
        If ``dst`` exists and ``replace`` is false.
    """
    src = Path(src)
    manifest, manifest_bytes, sig = _load_manifest(src, public_key, require_signature=False)
    payloads = _read_verified_files(src, manifest)
    payloads[MANIFEST_FILE] = manifest_bytes
    if sig is not None:
        payloads[SIGNATURE_FILE] = sig
    _write_files(Path(dst), payloads, replace=replace)
    return manifest
