"""Tests for common.bundle (signed model bundles) and common.atomic (crash-safe writes)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from common.bundle import (
    BUNDLE_FORMAT,
    Bundle,
    BundleError,
    copy_bundle,
    load_bundle,
    read_manifest,
    state_from_bytes,
    state_to_bytes,
    write_bundle,
)
from common.signing import SignatureError, public_key_fingerprint

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ALL_FILES = ["backbone.safetensors", "head.safetensors", "manifest.json", "manifest.sig"]


def _backbone() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }


def _head() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.tensor([[0.5, -1.0], [2.0, 0.25]]), "fc.bias": torch.zeros(2)}


def _write(path: Path, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "backbone": _backbone(),
        "head": _head(),
        "manifest": {"model": {"family": "mlp"}, "labels": ["no", "yes"]},
        "signing_key": KEY,
    }
    args.update(kwargs)
    return write_bundle(path, **args)


def _flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def parser_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every call of the safetensors parser (and make it fail loudly if reached)."""
    calls: list[int] = []

    def fake_load(data: bytes) -> dict[str, torch.Tensor]:
        calls.append(len(data))
        raise RuntimeError("safetensors parser reached")

    monkeypatch.setattr(safetensors.torch, "load", fake_load)
    return calls


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_restores_tensors_exactly(tmp_path: Path) -> None:
    _write(tmp_path / "b")

    bundle = load_bundle(tmp_path / "b", KEY.public_key(), require_signature=True)

    assert isinstance(bundle, Bundle)
    assert bundle.path == tmp_path / "b"
    assert set(bundle.backbone) == {"conv.weight", "bn.num_batches_tracked"}
    assert torch.equal(bundle.backbone["conv.weight"], _backbone()["conv.weight"])
    assert bundle.backbone["bn.num_batches_tracked"].dtype == torch.int64
    assert bundle.backbone["bn.num_batches_tracked"].item() == 7
    assert set(bundle.head) == {"fc.weight", "fc.bias"}
    assert torch.equal(bundle.head["fc.weight"], _head()["fc.weight"])


def test_write_fills_manifest_fields(tmp_path: Path) -> None:
    manifest = _write(tmp_path / "b")

    backbone_sha = hashlib.sha256((tmp_path / "b" / "backbone.safetensors").read_bytes())
    head_sha = hashlib.sha256((tmp_path / "b" / "head.safetensors").read_bytes())
    assert manifest["format"] == BUNDLE_FORMAT
    assert manifest["files"] == {
        "backbone.safetensors": backbone_sha.hexdigest(),
        "head.safetensors": head_sha.hexdigest(),
    }
    assert manifest["backbone_sha256"] == backbone_sha.hexdigest()
    assert manifest["signer"] == public_key_fingerprint(KEY.public_key())
    created = datetime.fromisoformat(manifest["created"])
    assert created.utcoffset() == UTC.utcoffset(None)
    assert manifest["labels"] == ["no", "yes"]


def test_written_manifest_is_what_load_returns(tmp_path: Path) -> None:
    written = _write(tmp_path / "b")

    assert load_bundle(tmp_path / "b", KEY.public_key()).manifest == written


def test_manifest_is_sorted_indented_json(tmp_path: Path) -> None:
    written = _write(tmp_path / "b")

    text = (tmp_path / "b" / "manifest.json").read_text()
    assert text == json.dumps(written, indent=2, sort_keys=True) + "\n"


def test_write_does_not_modify_the_callers_manifest(tmp_path: Path) -> None:
    manifest = {"labels": ["a", "b"]}

    _write(tmp_path / "b", manifest=manifest)

    assert manifest == {"labels": ["a", "b"]}


def test_bundle_files_are_world_readable(tmp_path: Path) -> None:
    _write(tmp_path / "b")

    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / "b").iterdir()}
    assert modes == dict.fromkeys(ALL_FILES, 0o644)
    assert stat.S_IMODE(os.stat(tmp_path / "b").st_mode) == 0o755


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)

    data = state_to_bytes({"w": weight, "tied": weight, "wt": weight.t()})

    loaded = state_from_bytes(data, "x")
    assert torch.equal(loaded["tied"], weight)
    assert torch.equal(loaded["wt"], weight.t())


# --- tampering -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("backbone.safetensors", BundleError),
        ("head.safetensors", BundleError),
        ("manifest.json", SignatureError),
        ("manifest.sig", SignatureError),
    ],
)
def test_flipped_byte_is_refused_with_key(tmp_path: Path, name: str, error: type) -> None:
    _write(tmp_path / "b")
    path = tmp_path / "b" / name
    _flip_byte(path, len(path.read_bytes()) // 2)

    with pytest.raises(error) as info:
        load_bundle(tmp_path / "b", KEY.public_key())

    assert str(tmp_path / "b") in str(info.value)
    # A flipped signature is reported against the manifest it fails to verify.
    assert (name if name != "manifest.sig" else "manifest.json") in str(info.value)


@pytest.mark.parametrize("name", ["backbone.safetensors", "head.safetensors"])
def test_flipped_weights_byte_is_refused_without_key(tmp_path: Path, name: str) -> None:
    _write(tmp_path / "b")
    path = tmp_path / "b" / name
    _flip_byte(path, len(path.read_bytes()) - 1)

    with pytest.raises(BundleError, match=rf"{name} has sha256 .*; expected"):
        load_bundle(tmp_path / "b")


def test_flipped_manifest_byte_without_key_is_a_json_error(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    _flip_byte(tmp_path / "b" / "manifest.json", 0)  # the opening brace

    with pytest.raises(BundleError, match=r"manifest\.json is not valid JSON"):
        load_bundle(tmp_path / "b")


def test_edited_hash_in_manifest_without_key_is_a_hash_error(tmp_path: Path) -> None:
    written = _write(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    head_sha = written["files"]["head.safetensors"]
    path.write_text(path.read_text().replace(head_sha, "0" * 64))

    with pytest.raises(BundleError, match=r"head\.safetensors has sha256"):
        load_bundle(tmp_path / "b")


def test_wrong_public_key_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "b")

    with pytest.raises(SignatureError, match=r"signature check failed for bundle .*manifest\.json"):
        load_bundle(tmp_path / "b", OTHER_KEY.public_key())


def test_signature_failure_is_also_a_bundle_error(tmp_path: Path) -> None:
    _write(tmp_path / "b")

    with pytest.raises(BundleError):
        load_bundle(tmp_path / "b", OTHER_KEY.public_key())


@pytest.mark.parametrize("name", ALL_FILES)
def test_missing_file_is_refused(tmp_path: Path, name: str) -> None:
    _write(tmp_path / "b")
    (tmp_path / "b" / name).unlink()

    with pytest.raises(BundleError, match=rf"bundle .* is missing {name}"):
        load_bundle(tmp_path / "b", KEY.public_key())


def test_missing_bundle_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")


def test_require_signature_without_key_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "b")

    with pytest.raises(BundleError, match="no public key was given"):
        load_bundle(tmp_path / "b", require_signature=True)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    path.write_text(path.read_text().replace('"format": 1', '"format": 2'))

    with pytest.raises(BundleError, match="has format 2; expected 1"):
        read_manifest(tmp_path / "b")


def test_manifest_listing_a_path_outside_the_bundle_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    path = tmp_path / "b" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../secret"] = "0" * 64
    path.write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match=r"lists '\.\./secret'; expected a plain file name"):
        read_manifest(tmp_path / "b")


# --- no tensor before the checks -------------------------------------------------------------


def test_wrong_key_fails_before_safetensors_is_called(
    tmp_path: Path, parser_calls: list[int]
) -> None:
    _write(tmp_path / "b")

    with pytest.raises(SignatureError):
        load_bundle(tmp_path / "b", OTHER_KEY.public_key())

    assert parser_calls == []


def test_corrupt_head_fails_before_backbone_is_parsed(
    tmp_path: Path, parser_calls: list[int]
) -> None:
    _write(tmp_path / "b")
    _flip_byte(tmp_path / "b" / "head.safetensors", 10)

    with pytest.raises(BundleError, match="head.safetensors"):
        load_bundle(tmp_path / "b", KEY.public_key())

    assert parser_calls == []


def test_read_manifest_verifies_without_building_tensors(
    tmp_path: Path, parser_calls: list[int]
) -> None:
    written = _write(tmp_path / "b")

    assert read_manifest(tmp_path / "b", KEY.public_key()) == written
    assert parser_calls == []


def test_read_manifest_refuses_a_corrupt_file(tmp_path: Path) -> None:
    _write(tmp_path / "b")
    _flip_byte(tmp_path / "b" / "backbone.safetensors", 20)

    with pytest.raises(BundleError, match=r"backbone\.safetensors has sha256"):
        read_manifest(tmp_path / "b", KEY.public_key())


def test_garbage_safetensors_bytes_name_where() -> None:
    with pytest.raises(BundleError, match="head.bin is not a valid safetensors file"):
        state_from_bytes(b"\x00" * 32, "head.bin")


# --- writing ---------------------------------------------------------------------------------


def test_write_refuses_an_existing_bundle(tmp_path: Path) -> None:
    first = _write(tmp_path / "b")

    with pytest.raises(FileExistsError):
        _write(tmp_path / "b", manifest={"labels": ["other"]})

    assert read_manifest(tmp_path / "b", KEY.public_key()) == first


def test_write_with_replace_swaps_in_the_new_bundle(tmp_path: Path) -> None:
    _write(tmp_path / "b")

    _write(tmp_path / "b", head={"fc.bias": torch.ones(3)}, replace=True)

    bundle = load_bundle(tmp_path / "b", KEY.public_key())
    assert torch.equal(bundle.head["fc.bias"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_non_json_manifest_value_is_refused_before_writing(tmp_path: Path) -> None:
    manifest = {"metrics": {"auc": float("nan")}}

    with pytest.raises(BundleError, match=r"manifest key 'metrics\.auc' holds nan"):
        _write(tmp_path / "b", manifest=manifest)

    assert list(tmp_path.iterdir()) == []


def test_non_tensor_state_entry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="state entry 'fc.bias' is a list"):
        _write(tmp_path / "b", head={"fc.bias": [0.0, 1.0]})


# --- copy ------------------------------------------------------------------------------------


def test_copy_bundle_produces_an_identical_verified_bundle(tmp_path: Path) -> None:
    written = _write(tmp_path / "src")

    manifest = copy_bundle(tmp_path / "src", tmp_path / "dst", KEY.public_key())

    assert manifest == written
    for name in ALL_FILES:
        assert (tmp_path / "dst" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()


def test_copy_bundle_refuses_a_tampered_source_and_writes_nothing(tmp_path: Path) -> None:
    _write(tmp_path / "src")
    _flip_byte(tmp_path / "src" / "head.safetensors", 30)

    with pytest.raises(BundleError, match="head.safetensors"):
        copy_bundle(tmp_path / "src", tmp_path / "dst", KEY.public_key())

    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- atomic writes ---------------------------------------------------------------------------


def test_atomic_dir_removes_everything_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_to_overwrite_before_the_body_runs(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    entered = False

    with pytest.raises(FileExistsError, match="pass replace=True"), atomic_dir(tmp_path / "out"):
        entered = True

    assert entered is False
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_a_target_created_meanwhile(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "racer.txt").write_text("racer")

    assert [p.name for p in (tmp_path / "out").iterdir()] == ["racer.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_renames_on_success(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "a" / "out") as tmp:
        (tmp / "f.txt").write_text("done")

    assert (tmp_path / "a" / "out" / "f.txt").read_text() == "done"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["out"]


def test_atomic_write_bytes_replaces_content_and_sets_mode(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"old content")

    atomic_write_bytes(path, b"new", mode=0o600)

    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_atomic_write_text_writes_utf8(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "t.txt", "µ")

    assert (tmp_path / "t.txt").read_bytes() == b"\xc2\xb5"
