"""A node's local caches: backbones keyed by sha256, and frozen-backbone features.

Backbones arrive once per node (see `server/provisioning.py`). A file whose hash does not match
the hash the server announced is refused, and with the server's public key the manifest's
signature is checked too. Features of a frozen backbone are computed once per
(backbone, trainable mode, local data) and reused every round.

One process serves many messages (a simulation worker serves many virtual hospitals), so what
was read and verified is kept per process: a backbone entry is re-read, re-hashed and
re-verified only when one of its files changed on disk (size, mtime or inode), and features
stay in memory beside their file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common import records as rk
from common.atomic import atomic_dir, atomic_write_bytes
from common.bundle import BundleError
from common.names import printable
from common.signing import SignatureError, load_public_key, verify

ENTRY_FILES = ("backbone.safetensors", "manifest.json", "manifest.sig")
MEMORY_ENTRIES = 4096  # features kept in memory per process (a simulated node's are small)

Stamp = tuple[tuple[int, int, int], ...]
# (entry directory, sha256, federation key) -> (stamp of its files, bytes, verified manifest)
_verified: dict[tuple[str, str, bytes], tuple[Stamp, bytes, dict[str, Any]]] = {}
_features: OrderedDict[str, np.ndarray] = OrderedDict()


def _stamp(entry: Path) -> Stamp | None:
    """Size, mtime and inode of an entry's files; None if one is missing."""
    out = []
    for name in ENTRY_FILES:
        try:
            st = (entry / name).stat()
        except OSError:
            return None
        out.append((st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


_keys: dict[str, tuple[Stamp, Ed25519PublicKey]] = {}  # path -> (its stamp, the key)


def federation_key(path: Path | None, what: str) -> Ed25519PublicKey:
    """The federation's public key at `path`, which every bundle a hospital keeps (`what`)
    is verified with: read once per process and file version (a stat per message, not a
    read and parse; a key rotated in place is read again)."""
    if path is None:
        raise BundleError("this hospital has no federation public key (signing.pub) to "
                          f"verify {what} with; refused")
    try:
        st = os.stat(path)
    except OSError:
        return load_public_key(path)  # says what is wrong with it, in one sentence
    stamp = ((st.st_mtime_ns, st.st_size, st.st_ino),)
    memo = os.path.abspath(path)
    hit = _keys.get(memo)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    key = load_public_key(path)
    _keys[memo] = (stamp, key)
    return key


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
        """True when the cache holds this backbone and its manifest verifies with our key.

        An entry that no longer verifies (a damaged file, a rotated federation key) counts as
        missing, so the server sends it again and `store` replaces it."""
        try:
            self.load(sha256)
        except MissingBackbone:
            return False
        return True

    def _public_key(self) -> Ed25519PublicKey:
        """The federation's key; its absence is the hospital's setup, not a cache miss."""
        return federation_key(self.signing_pub, "the backbone")

    @staticmethod
    def _check_manifest(pub: Ed25519PublicKey, sha256: str, manifest_json: str,
                        sig_hex: str) -> dict[str, Any]:
        try:
            manifest = json.loads(manifest_json)
        except json.JSONDecodeError as err:
            raise BundleError("the manifest sent with the backbone is not valid JSON") from err
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise BundleError("the manifest sent with the backbone is not a bundle manifest")
        listed = manifest["files"].get("backbone.safetensors")
        if listed != sha256:
            # unverified text from the server: repr-quoted, short, no control characters
            raise BundleError("the manifest sent with the backbone lists a different hash "
                              f"({printable(repr(listed), 20)}) than announced "
                              f"({sha256[:12]}…)")
        try:
            signature = bytes.fromhex(sig_hex)
        except ValueError as err:
            raise BundleError("the signature sent with the backbone is not hex") from err
        verify(pub, manifest_json.encode("utf-8"), signature,
               where="manifest sent with the backbone")
        return dict(manifest)

    def store(self, sha256: str, file_bytes: bytes, manifest_json: str, sig_hex: str) -> None:
        """Check and keep a backbone sent by the server (atomically)."""
        actual = hashlib.sha256(file_bytes).hexdigest()
        if actual != sha256:
            raise BundleError(f"received backbone has sha256 {actual[:12]}…, "
                              f"expected {sha256[:12]}…; refused")
        self._check_manifest(self._public_key(), sha256, manifest_json, sig_hex)
        final = self.entry(sha256)
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "backbone.safetensors").write_bytes(file_bytes)
            (tmp / "manifest.json").write_text(manifest_json, encoding="utf-8")
            (tmp / "manifest.sig").write_bytes(bytes.fromhex(sig_hex))

    def load(self, sha256: str) -> tuple[bytes, dict[str, Any]]:
        """The backbone file bytes and manifest; MissingBackbone if absent, altered, or its
        manifest does not verify with this hospital's federation key.

        Verified once per process, file version and key (see the module notes)."""
        entry = self.entry(sha256)
        stamp = _stamp(entry)
        if stamp is None:  # before the key: an empty cache is a miss, whatever the setup
            raise MissingBackbone(f"{rk.MISSING_BACKBONE}: backbone {sha256[:12]}… is not in this "
                                  "node's cache")
        pub = self._public_key()
        # an absolute path, not a resolved one: resolving costs a syscall per component on
        # every message, and two spellings of one entry only mean one more verification;
        # the key's bytes, not its path: a rotated key rewritten in place verifies again
        key = (os.path.abspath(entry), sha256, pub.public_bytes_raw())
        seen = _verified.get(key)
        if seen is not None and seen[0] == stamp:
            return seen[1], seen[2]
        _verified.pop(key, None)
        try:
            file_bytes = (entry / "backbone.safetensors").read_bytes()
        except OSError:
            file_bytes = b""  # removed since the stamp: a miss like any other
        if hashlib.sha256(file_bytes).hexdigest() != sha256:
            raise MissingBackbone(f"{rk.MISSING_BACKBONE}: backbone {sha256[:12]}… is not in this "
                                  "node's cache")
        try:
            manifest_json = (entry / "manifest.json").read_text(encoding="utf-8")
            sig_hex = (entry / "manifest.sig").read_bytes().hex()
            manifest = self._check_manifest(pub, sha256, manifest_json, sig_hex)
        except (OSError, UnicodeDecodeError, BundleError, SignatureError) as err:
            # a cached entry we cannot vouch for is one the server must send again
            raise MissingBackbone(f"{rk.MISSING_BACKBONE}: backbone {sha256[:12]}… in this "
                                  f"node's cache no longer verifies ({err})") from err
        if _stamp(entry) == stamp:  # unchanged while we read it
            _verified[key] = (stamp, file_bytes, manifest)
        return file_bytes, manifest


class FeatureCache:
    """`<root>/<key>.npz` with the frozen-backbone features of a site's training split."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def key(backbone_sha: str, trainable: str, data_fingerprint: str) -> str:
        """Cache key: which backbone, which blocks are frozen, which local data.

        `<group>-<digest>`: the group (backbone and frozen blocks) lets `put` find the
        features of the same model for data this node no longer has."""
        group = hashlib.sha256(f"{backbone_sha}|{trainable}".encode()).hexdigest()[:16]
        text = f"{backbone_sha}|{trainable}|{data_fingerprint}"
        return f"{group}-{hashlib.sha256(text.encode()).hexdigest()}"

    def get(self, key: str) -> np.ndarray | None:
        """Cached training features, or None."""
        path = self.root / f"{key}.npz"
        memo = os.path.abspath(path)  # see BackboneCache.load
        if memo in _features:
            _features.move_to_end(memo)
            return _features[memo]
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                train = np.asarray(npz["train"])
        except (OSError, ValueError, KeyError):
            return None  # a damaged cache entry is recomputed, never trusted
        self._remember(memo, train)
        return train

    @staticmethod
    def _remember(memo: str, train: np.ndarray) -> None:
        # shared by every message of this node in this process; nothing writes to it
        _features[memo] = train
        _features.move_to_end(memo)
        while len(_features) > MEMORY_ENTRIES:
            _features.popitem(last=False)

    def put(self, key: str, train: np.ndarray) -> None:
        """Store features atomically."""
        import io

        buf = io.BytesIO()
        np.savez(buf, train=train)
        # computed from the hospital's patient rows: readable by this user only, whatever the
        # umask or the directories above
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.root / f"{key}.npz"
        atomic_write_bytes(path, buf.getvalue(), mode=0o600)
        self._remember(os.path.abspath(path), train)
        self._prune(key)

    def _prune(self, key: str) -> None:
        """Drop the features of the same backbone and frozen blocks for other data: a node
        holds one data set, so they belong to a data file since replaced and would otherwise
        pile up, one file per change."""
        group = key.split("-", 1)[0]
        for old in self.root.glob(f"{group}-*.npz"):
            if old.stem != key:
                old.unlink(missing_ok=True)
                _features.pop(os.path.abspath(old), None)
