"""A node's local caches: backbones keyed by sha256, and frozen-backbone features.

Backbones arrive once per node (see `server/provisioning.py`). A file whose hash does not match
the hash the server announced is refused, and with the server's public key the manifest's
signature is checked too. Features of a frozen backbone are computed once per
(backbone, trainable mode, local data) and reused every round.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from common import records as rk
from common.atomic import atomic_dir, atomic_write_bytes
from common.bundle import BundleError
from common.signing import load_public_key, verify


class MissingBackbone(RuntimeError):
    """The node's cache does not hold the backbone a message refers to."""


class BackboneCache:
    """`<root>/<sha256>/{backbone.safetensors, manifest.json, manifest.sig}`."""

    def __init__(self, root: Path, signing_pub: Path | None = None) -> None:
        self.root = Path(root)
        self.signing_pub = signing_pub

    def entry(self, sha256: str) -> Path:
        """Directory of one cached backbone."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise BundleError(f"backbone hash must be 64 hex characters, got {sha256[:80]!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """True when the cache holds a backbone file with exactly this hash."""
        path = self.entry(sha256) / "backbone.safetensors"
        return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256

    def _check_manifest(self, sha256: str, manifest_json: str, sig_hex: str) -> dict[str, Any]:
        try:
            manifest = json.loads(manifest_json)
        except json.JSONDecodeError as err:
            raise BundleError("the manifest sent with the backbone is not valid JSON") from err
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise BundleError("the manifest sent with the backbone is not a bundle manifest")
        listed = manifest["files"].get("backbone.safetensors")
        if listed != sha256:
            raise BundleError("the manifest sent with the backbone lists a different hash "
                              f"({str(listed)[:12]}…) than announced ({sha256[:12]}…)")
        if self.signing_pub is None:
            raise BundleError("this hospital has no federation public key (signing.pub) to "
                              "verify the backbone with; refused")
        try:
            signature = bytes.fromhex(sig_hex)
        except ValueError as err:
            raise BundleError("the signature sent with the backbone is not hex") from err
        verify(load_public_key(self.signing_pub), manifest_json.encode("utf-8"), signature,
               where="manifest sent with the backbone")
        return dict(manifest)

    def store(self, sha256: str, file_bytes: bytes, manifest_json: str, sig_hex: str) -> None:
        """Check and keep a backbone sent by the server (atomically)."""
        actual = hashlib.sha256(file_bytes).hexdigest()
        if actual != sha256:
            raise BundleError(f"received backbone has sha256 {actual[:12]}…, "
                              f"expected {sha256[:12]}…; refused")
        self._check_manifest(sha256, manifest_json, sig_hex)
        final = self.entry(sha256)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "backbone.safetensors").write_bytes(file_bytes)
            (tmp / "manifest.json").write_text(manifest_json, encoding="utf-8")
            (tmp / "manifest.sig").write_bytes(bytes.fromhex(sig_hex))

    def load(self, sha256: str) -> tuple[bytes, dict[str, Any]]:
        """The backbone file bytes and manifest; MissingBackbone if absent or altered."""
        if not self.has(sha256):
            raise MissingBackbone(f"{rk.MISSING_BACKBONE}: backbone {sha256[:12]}… is not in this "
                                  "node's cache")
        entry = self.entry(sha256)
        manifest_json = (entry / "manifest.json").read_text(encoding="utf-8")
        sig_hex = (entry / "manifest.sig").read_bytes().hex()
        manifest = self._check_manifest(sha256, manifest_json, sig_hex)
        return (entry / "backbone.safetensors").read_bytes(), manifest


class FeatureCache:
    """`<root>/<key>.npz` with the frozen-backbone features of a site's training split."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(backbone_sha: str, trainable: str, data_fingerprint: str) -> str:
        """Cache key: which backbone, which blocks are frozen, which local data."""
        text = f"{backbone_sha}|{trainable}|{data_fingerprint}"
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        """Cached training features, or None."""
        path = self.root / f"{key}.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                return np.asarray(npz["train"])
        except (OSError, ValueError, KeyError):
            return None  # a damaged cache entry is recomputed, never trusted

    def put(self, key: str, train: np.ndarray) -> None:
        """Store features atomically."""
        import io

        buf = io.BytesIO()
        np.savez(buf, train=train)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / f"{key}.npz", buf.getvalue())
