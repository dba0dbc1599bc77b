"""Per-process caches of a node (client/cache.py, client/node.py, common/settings.py): what was
read, verified or built once is reused, and a changed file is read again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import client.cache
from client.cache import BackboneCache, FeatureCache, MissingBackbone
from client.node import Node
from common.settings import NodeSettings, RunSettings
from server.federation import load_payload
from server.provisioning import BackbonePayload
from tests.conftest import HEART


@pytest.fixture
def stored(tmp_path: Path, heart_bundle: Path, signing_pub_path: Path
           ) -> tuple[BackboneCache, BackbonePayload]:
    payload = load_payload(heart_bundle)
    cache = BackboneCache(tmp_path / "backbones", signing_pub_path)
    cache.store(payload.sha256, payload.file_bytes, payload.manifest_json, payload.manifest_sig)
    return cache, payload


def _count_verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = client.cache.verify

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(client.cache, "verify", counting)
    return calls


def test_a_backbone_is_verified_once_per_file_version(stored, monkeypatch) -> None:
    cache, payload = stored
    calls = _count_verifications(monkeypatch)
    first = cache.load(payload.sha256)
    second = cache.load(payload.sha256)
    assert first[0] == payload.file_bytes and second[0] is first[0]
    assert len(calls) <= 1  # 0 when `store` already left it verified in this process
    # the same size, other bytes, a newer file: read, hashed and refused
    path = cache.entry(payload.sha256) / "backbone.safetensors"
    tampered = bytearray(payload.file_bytes)
    tampered[-1] ^= 0xFF
    path.write_bytes(bytes(tampered))
    with pytest.raises(MissingBackbone):
        cache.load(payload.sha256)
    path.write_bytes(payload.file_bytes)  # put back: verified again, then served
    before = len(calls)
    assert cache.load(payload.sha256)[0] == payload.file_bytes
    assert len(calls) == before + 1


def test_a_changed_manifest_is_checked_again(stored) -> None:
    cache, payload = stored
    cache.load(payload.sha256)
    manifest = cache.entry(payload.sha256) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"', "'", 1))  # no longer JSON
    with pytest.raises(Exception, match="manifest"):
        cache.load(payload.sha256)


def test_the_config_is_parsed_once_per_file_version(tmp_path: Path, heart_bundle: Path,
                                                     signing_key_path: Path) -> None:
    config = tmp_path / "heart.yaml"
    config.write_text(HEART.read_text())
    run = RunSettings(config_path=config, overrides=("federation.rounds=3",),
                      run_dir=tmp_path / "run", bundle=heart_bundle, keys=signing_key_path)
    first = run.load_config()
    assert run.load_config() is first
    text = config.read_text().replace("name: heart", "name: heart-edited", 1)
    assert text != config.read_text()
    config.write_text(text)
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a visible new version
    second = run.load_config()
    assert second is not first and second.name == "heart-edited"
    assert second.federation.rounds == 3


def _message_node(tmp_path: Path, cache: BackboneCache) -> Node:
    """The node of one message at a deployed hospital (heart config, workdir tmp_path)."""
    run = RunSettings(config_path=HEART, overrides=(), run_dir=tmp_path / "run",
                      bundle=None, keys=tmp_path / "unused.key")
    settings = NodeSettings(site_name="cleveland", partition_id=None, num_partitions=0,
                            data_path=None, workdir=tmp_path, device="cpu",
                            signing_pub=cache.signing_pub)
    return Node(run.load_config(), run, settings)


def test_each_message_gets_its_own_copy_of_the_built_model(tmp_path: Path, stored) -> None:
    cache, payload = stored
    node = _message_node(tmp_path, cache)
    one, _, names = node.model(payload.sha256)
    two, _, names2 = node.model(payload.sha256)
    assert one is not two and names == names2
    with torch.no_grad():
        for p in one.parameters():
            p.add_(1.0)
    three, _, _ = node.model(payload.sha256)
    for a, b in zip(two.state_dict().values(), three.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in
                   zip(one.state_dict().values(), three.state_dict().values(), strict=True))


def test_one_message_checks_its_backbone_files_once_the_next_one_again(
        tmp_path: Path, stored, monkeypatch: pytest.MonkeyPatch) -> None:
    """A train message with evaluate_with_train builds two models (scoring, then training):
    the backbone's files are looked at once for both; a new message looks again."""
    cache, payload = stored
    cache.load(payload.sha256)  # verified once in this process: what each message re-checks
    looks: list[Path] = []
    original = client.cache._stamp
    monkeypatch.setattr(client.cache, "_stamp", lambda entry: looks.append(entry) or
                        original(entry))
    node = _message_node(tmp_path, cache)
    node.model(payload.sha256, scoring=True)
    node.model(payload.sha256)
    assert len(looks) == 1
    _message_node(tmp_path, cache).model(payload.sha256)
    assert len(looks) == 2


def test_features_stay_in_memory_after_they_are_written(tmp_path: Path, monkeypatch) -> None:
    cache = FeatureCache(tmp_path / "features")
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    key = FeatureCache.key("a" * 64, "head", "fingerprint")
    cache.put(key, features)

    def no_disk(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("features were read from disk again")

    monkeypatch.setattr(np, "load", no_disk)
    np.testing.assert_array_equal(cache.get(key), features)
    other = FeatureCache(tmp_path / "other-node" / "features")
    assert other.get(key) is None  # another node's cache is another file


def _simulated_node(tmp_path: Path, cache: BackboneCache, overrides: tuple[str, ...] = (),
                    partition_id: int = 0) -> Node:
    run = RunSettings(config_path=HEART, overrides=overrides, run_dir=tmp_path / "run",
                      bundle=None, keys=tmp_path / "unused.key")
    settings = NodeSettings(site_name="", partition_id=partition_id, num_partitions=4,
                            data_path=None, workdir=tmp_path, device="cpu",
                            signing_pub=cache.signing_pub)
    return Node(run.load_config(), run, settings)


def test_scoring_reuses_one_model_without_leaking_between_messages(tmp_path: Path, stored
                                                                   ) -> None:
    cache, payload = stored
    node = _simulated_node(tmp_path, cache)
    client.node._built_models.clear()
    model, _, names = node.model(payload.sha256)
    base = {n: t.detach().clone() for n, t in model.state_dict().items()}
    arrays_a = {n: base[n] + 0.5 for n in names}
    arrays_b = {n: base[n] * -1.0 for n in names}
    reference = client.node.evaluate_local(node, arrays_b, payload.sha256)[0]
    client.node._built_models.clear()  # a fresh process: A first, then B
    built = {n: t.detach().clone() for n, t in node.model(payload.sha256)[0].state_dict().items()}
    client.node.evaluate_local(node, arrays_a, payload.sha256)
    scratch = node.model(payload.sha256, scoring=True)[0]
    assert scratch is node.model(payload.sha256, scoring=True)[0]  # no copy per message
    after = client.node.evaluate_local(node, arrays_b, payload.sha256)[0]
    assert after.keys() == reference.keys()
    for key, value in reference.items():
        assert after[key] == pytest.approx(value, nan_ok=True), key
    trained_copy = node.model(payload.sha256)[0].state_dict()  # what training starts from
    for n, t in built.items():
        assert torch.equal(trained_copy[n], t), n


def test_simulated_sites_stay_built_when_a_worker_serves_many_hospitals(
        tmp_path: Path, stored) -> None:
    import json

    from client.local_data import simulated_site

    cache, payload = stored
    manifest = json.loads(payload.manifest_json)
    node = _simulated_node(tmp_path, cache, ("federation.data.source=synthetic",
                                             "federation.data.synthetic_sites=150",
                                             "federation.data.synthetic_samples=3000"))
    data, seed = node.cfg.federation.data, node.cfg.seed
    first = [simulated_site(data, seed, manifest, pid) for pid in range(150)]
    again = [simulated_site(data, seed, manifest, pid) for pid in range(150)]  # a 2nd round
    assert all(a is b for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("damage", ["flip-signature", "no-manifest", "manifest-not-json"])
def test_an_entry_whose_manifest_no_longer_verifies_counts_as_missing(stored, damage) -> None:
    """Otherwise the node errors on every message and the server never sends it again."""
    cache, payload = stored
    cache.load(payload.sha256)  # verified once in this process: the change must be seen
    entry = cache.entry(payload.sha256)
    if damage == "flip-signature":
        sig = bytearray((entry / "manifest.sig").read_bytes())
        sig[0] ^= 1
        (entry / "manifest.sig").write_bytes(bytes(sig))
    elif damage == "no-manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text("{not json")
    for name in ("manifest.sig", "manifest.json"):  # a visible new version, however fast
        if (entry / name).exists():
            st = (entry / name).stat()
            os.utime(entry / name, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not cache.has(payload.sha256)
    with pytest.raises(MissingBackbone):
        cache.load(payload.sha256)
    cache.store(payload.sha256, payload.file_bytes, payload.manifest_json, payload.manifest_sig)
    assert cache.has(payload.sha256) and cache.load(payload.sha256)[0] == payload.file_bytes


def test_a_rotated_federation_key_verifies_the_cached_entry_again(
        stored, tmp_path: Path) -> None:
    """A hospital given a new signing.pub must not keep trusting what the old key signed."""
    from common.signing import load_or_create_signing_key, public_key_path

    cache, payload = stored
    own_pub = tmp_path / "hospital" / "signing.pub"  # this test's copy: rewritten below
    own_pub.parent.mkdir()
    own_pub.write_bytes(Path(str(cache.signing_pub)).read_bytes())
    cache = BackboneCache(cache.root, own_pub)
    assert cache.has(payload.sha256)  # verified with the current key, remembered
    new_key = tmp_path / "rotated" / "signing.key"
    load_or_create_signing_key(new_key)
    rotated = BackboneCache(cache.root, public_key_path(new_key))
    assert not rotated.has(payload.sha256)
    with pytest.raises(MissingBackbone):
        rotated.load(payload.sha256)
    # the same path rewritten with the new key (an operator's copy) is noticed too
    own_pub.write_bytes(public_key_path(new_key).read_bytes())
    with pytest.raises(MissingBackbone):
        cache.load(payload.sha256)


def test_features_of_older_data_are_pruned_when_new_ones_are_written(tmp_path: Path) -> None:
    """A hospital whose data file changes every week must not keep every week's features."""
    cache = FeatureCache(tmp_path / "features")
    features = np.zeros((2, 3), dtype=np.float32)
    week1 = FeatureCache.key("a" * 64, "head", "data-week-1")
    other_mode = FeatureCache.key("a" * 64, "head+last-1", "data-week-1")
    other_backbone = FeatureCache.key("b" * 64, "head", "data-week-1")
    for key in (week1, other_mode, other_backbone):
        cache.put(key, features)
    week2 = FeatureCache.key("a" * 64, "head", "data-week-2")
    cache.put(week2, features + 1)
    kept = sorted(p.stem for p in (tmp_path / "features").glob("*.npz"))
    assert kept == sorted([week2, other_mode, other_backbone])
    assert cache.get(week1) is None  # not served from memory either
    np.testing.assert_array_equal(cache.get(week2), features + 1)


def test_features_are_readable_by_the_hospitals_user_only(tmp_path: Path) -> None:
    """They are computed from patient rows; they were written 0644 in a 0755 directory, so
    any user of a shared hospital server could read them."""
    old = os.umask(0o022)
    try:
        cache = FeatureCache(tmp_path / "node" / "features")
        cache.put(FeatureCache.key("a" * 64, "head", "data"), np.zeros((2, 3), np.float32))
    finally:
        os.umask(old)
    assert (tmp_path / "node" / "features").stat().st_mode & 0o777 == 0o700
    written = list((tmp_path / "node" / "features").glob("*.npz"))
    assert len(written) == 1 and written[0].stat().st_mode & 0o777 == 0o600
