"""The model registry: signed versions, `latest`/`best` pointers, version specs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.bundle import BundleError, load_bundle
from common.registry import Registry

BACKBONE = {"backbone.0.weight": torch.zeros(3, 2)}


def _publish(reg: Registry, version: int, score: float | None) -> None:
    head = {"head.weight": torch.full((2, 3), float(version))}
    reg.publish(version, BACKBONE, head, {"version": version, "round": version}, score, "auc")


def _pointer(reg: Registry, name: str) -> dict | None:
    path = reg.root / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def reg(tmp_path: Path, signing_key: Ed25519PrivateKey) -> Registry:
    return Registry(tmp_path / "registry", signing_key)


def _scores(reg: Registry, scores: list[float | None]) -> Registry:
    for version, score in enumerate(scores):
        _publish(reg, version, score)
    return reg


def test_published_version_is_a_signed_bundle(reg, signing_key) -> None:
    _publish(reg, 0, 0.5)
    bundle = load_bundle(reg.version_dir(0), signing_key.public_key(), require_signature=True)
    assert bundle.manifest["version"] == 0
    assert torch.equal(bundle.head["head.weight"], torch.zeros(2, 3))


def test_latest_follows_every_publish_even_a_worse_one(reg) -> None:
    _scores(reg, [0.9, 0.5])
    assert _pointer(reg, "latest") == {"version": 1}


def _best(version: int, value: float | None, metric: str = "auc") -> dict:
    return {"version": version, "metric": metric, "split": "validation",
            "source": "validation", "value": value}


def test_best_moves_on_a_better_score_and_a_tie_goes_to_the_later_version(reg) -> None:
    _scores(reg, [0.5, 0.9, 0.7, 0.9, 0.8])  # v3 ties v1: the later round wins
    assert _pointer(reg, "best") == _best(3, 0.9)


def test_for_a_loss_lower_is_better(reg) -> None:
    for version, score in enumerate([0.7, 0.4, 0.6]):
        head = {"head.weight": torch.full((2, 3), float(version))}
        reg.publish(version, BACKBONE, head, {"version": version}, score, "loss", "sites")
    assert _pointer(reg, "best") == {**_best(1, 0.4, "loss"), "source": "sites"}


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_best_ignores_undefined_and_infinite_scores(reg, bad) -> None:
    _scores(reg, [0.6, bad])
    assert _pointer(reg, "best") == _best(0, 0.6)


@pytest.mark.parametrize("undefined", [None, math.nan])
def test_first_version_is_best_while_no_score_is_defined(reg, undefined) -> None:
    _scores(reg, [undefined, undefined])
    assert _pointer(reg, "best") == _best(0, None)


def test_first_defined_score_takes_over_from_an_undefined_best(reg) -> None:
    _scores(reg, [None, 0.1])
    assert _pointer(reg, "best") == _best(1, 0.1)


def test_pointers_are_valid_json_files_with_a_trailing_newline(reg) -> None:
    _scores(reg, [0.5])
    assert (reg.root / "latest.json").read_text().endswith("}\n")


def test_resolve_latest_best_and_numbers(reg) -> None:
    _scores(reg, [0.5, 0.9, 0.7])
    assert reg.resolve("latest") == reg.root / "v0002"
    assert reg.resolve("best") == reg.root / "v0001"
    assert reg.resolve("0") == reg.root / "v0000"
    for bad in (" 2 ", "latest\n", "2\n", "-1", "1e3"):  # full matches only
        with pytest.raises(BundleError):
            reg.resolve(bad)


def test_versions_ignores_temp_dirs_unsigned_dirs_and_other_files(reg) -> None:
    _scores(reg, [0.5, 0.6])
    (reg.root / ".v0002.tmp-abc123").mkdir()  # an interrupted atomic write
    (reg.root / ".v0002.tmp-abc123" / "manifest.sig").write_bytes(b"x")
    (reg.root / "v0003").mkdir()  # no manifest.sig: never completed
    (reg.root / "v7").mkdir()  # not the vNNNN pattern
    (reg.root / "v7" / "manifest.sig").write_bytes(b"x")
    (reg.root / "notes.txt").write_text("hello")
    assert reg.versions() == [0, 1]


def test_versions_of_a_missing_registry_is_empty(tmp_path) -> None:
    assert Registry(tmp_path / "nowhere").versions() == []


def test_resolve_unknown_version_names_it(reg) -> None:
    _scores(reg, [0.5])
    with pytest.raises(BundleError, match="has no version 7"):
        reg.resolve("7")


@pytest.mark.parametrize("spec", ["v1", "newest", "-1", "1.0", ""])
def test_resolve_garbage_spec_is_refused(reg, spec) -> None:
    _scores(reg, [0.5, 0.6])
    with pytest.raises(BundleError, match="must be a number, 'latest' or 'best'"):
        reg.resolve(spec)


@pytest.mark.parametrize("spec", ["latest", "best"])
def test_resolve_pointer_of_an_empty_registry_is_an_error(reg, spec) -> None:
    with pytest.raises(BundleError, match=f"no '{spec}' version yet"):
        reg.resolve(spec)


def test_read_only_registry_refuses_to_publish(tmp_path) -> None:
    with pytest.raises(BundleError, match="read-only"):
        _publish(Registry(tmp_path / "registry"), 0, 0.5)


def test_malformed_pointer_is_an_error(reg) -> None:
    _scores(reg, [0.5])
    (reg.root / "latest.json").write_text('{"version": "two"}\n')
    with pytest.raises(BundleError, match="malformed"):
        reg.resolve("latest")


def test_after_a_dropped_version_no_pointer_names_it(reg) -> None:
    """A resume drops uncommitted versions; `best` kept naming a dropped one when no
    version left had a defined score (resolve('best') then failed), and both pointers when
    none was left at all."""
    from server.checkpoint import drop_uncommitted_versions

    _scores(reg, [None, 0.7])
    assert _pointer(reg, "best")["version"] == 1
    drop_uncommitted_versions(reg.root, 0)
    reg.repair_pointers("auc")
    assert _pointer(reg, "best") is None and _pointer(reg, "latest") == {"version": 0}
    drop_uncommitted_versions(reg.root, -1)
    reg.repair_pointers("auc")
    assert _pointer(reg, "latest") is None
