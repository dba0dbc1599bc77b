"""The ClientApp's handlers called directly with Flower messages (no Ray, no SuperLink).

Heart config, simulated nodes (`partition-id` i of 4): 0 cleveland, 1 hungary, 2 switzerland,
3 va, each in <run dir>/nodes/<site name>/. FLamby's split sizes (train/test): 199/104,
172/89, 30/16, 85/45; our validation split is a fifth of FLamby's train split.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

import client.node
from client.cache import MissingBackbone
from client.client_app import make_client_app
from common import records as rk
from common.bundle import BundleError, load_bundle
from common.config_check import load_config
from common.data.heart import load_heart_sites
from common.pretrain import pretrain
from common.settings import RunSettings
from server.federation import load_payload
from server.provisioning import BackbonePayload
from tests.conftest import FAST_PRETRAIN, HEART
from tests.flower_helpers import call_client_app, task_identity

SITES = ("cleveland", "hungary", "switzerland", "va")
SPLITS = [s.sizes() for s in load_heart_sites("flamby")[1]]  # the data layer's own splits
# heart.yaml: the last backbone block is 16 wide, 2 classes -> a 16 -> 2 linear head
HEAD_SHAPES = {"head.weight": (2, 16), "head.bias": (2,)}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


@pytest.fixture
def settings(tmp_path: Path, heart_bundle: Path, signing_key_path: Path) -> RunSettings:
    """A fresh run directory per test, so every node starts with empty caches."""
    return RunSettings(config_path=HEART, overrides=(), run_dir=tmp_path / "run",
                       bundle=heart_bundle, keys=signing_key_path)


@pytest.fixture
def app(settings: RunSettings) -> ClientApp:
    return make_client_app(settings)


@pytest.fixture(scope="module")
def payload(heart_bundle: Path) -> BackbonePayload:
    """The backbone exactly as the server sends it."""
    return load_payload(heart_bundle)


def _node(i: int) -> dict[str, int]:
    return {"partition-id": i, "num-partitions": 4}


def _ask(app: ClientApp, payload: BackbonePayload, i: int, with_file: bool) -> Message:
    content = RecordDict({rk.BUNDLE_META: payload.meta()})
    if with_file:
        content[rk.BACKBONE_FILE] = payload.arrays()
    return call_client_app(app, f"query.{rk.QUERY_BACKBONE}", content, _node(i))


def _head(heart_bundle: Path) -> dict[str, torch.Tensor]:
    return load_bundle(heart_bundle).head


def _round_content(heart_bundle: Path, sha: str, server_round: int = 1) -> RecordDict:
    return RecordDict({
        rk.ARRAYS: ArrayRecord(_head(heart_bundle)),
        rk.CONFIG: ConfigRecord({rk.SERVER_ROUND: server_round, rk.BACKBONE_SHA256: sha}),
    })


def _train(app: ClientApp, heart_bundle: Path, payload: BackbonePayload, i: int) -> Message:
    return call_client_app(app, "train", _round_content(heart_bundle, payload.sha256), _node(i))


def _has_backbone(reply: Message) -> int:
    return int(reply.content.metric_records[rk.METRICS][rk.HAS_BACKBONE])  # type: ignore[arg-type]


# --- query.backbone ----------------------------------------------------------------------
def test_query_without_file_on_empty_cache_says_no_backbone(app, payload) -> None:
    assert _has_backbone(_ask(app, payload, 0, with_file=False)) == 0


def test_query_with_file_stores_the_backbone(app, payload, settings) -> None:
    reply = _ask(app, payload, 1, with_file=True)
    stored = settings.run_dir / "nodes" / "hungary" / "backbones" / payload.sha256
    assert _has_backbone(reply) == 1
    assert hashlib.sha256((stored / "backbone.safetensors").read_bytes()).hexdigest() \
        == payload.sha256


def test_stored_backbone_is_found_by_a_later_query_without_file(app, payload) -> None:
    _ask(app, payload, 2, with_file=True)
    assert _has_backbone(_ask(app, payload, 2, with_file=False)) == 1


def test_backbone_with_wrong_sha_is_refused_and_not_stored(app, payload, settings) -> None:
    wrong = hashlib.sha256(b"not the backbone").hexdigest()
    bad = BackbonePayload(wrong, payload.file_bytes, payload.manifest_json, payload.manifest_sig)
    with pytest.raises(BundleError, match="refused"):
        _ask(app, bad, 0, with_file=True)
    assert not (settings.run_dir / "nodes" / "cleveland" / "backbones" / wrong).exists()
    assert _has_backbone(_ask(app, payload, 0, with_file=False)) == 0


def test_node_with_signing_key_refuses_a_badly_signed_manifest(app, payload, heart_bundle,
                                                               signing_pub_path) -> None:
    forged = BackbonePayload(payload.sha256, payload.file_bytes, payload.manifest_json,
                             "00" * 64)
    content = RecordDict({rk.BUNDLE_META: forged.meta(), rk.BACKBONE_FILE: forged.arrays()})
    node = {**_node(0), "signing-pub": str(signing_pub_path)}
    with pytest.raises(ValueError, match="signature"):
        call_client_app(app, f"query.{rk.QUERY_BACKBONE}", content, node)


# --- train ---------------------------------------------------------------------------------
def test_train_replies_exactly_the_trainable_tensors(app, payload, heart_bundle) -> None:
    _ask(app, payload, 0, with_file=True)
    arrays = _train(app, heart_bundle, payload, 0).content.array_records[rk.ARRAYS]
    shapes = {name: tuple(arr.shape) for name, arr in arrays.items()}
    assert shapes == HEAD_SHAPES


def test_train_changes_the_head(app, payload, heart_bundle) -> None:
    _ask(app, payload, 0, with_file=True)
    sent = _head(heart_bundle)
    got = _train(app, heart_bundle, payload, 0).content.array_records[rk.ARRAYS]
    got_t = got.to_torch_state_dict()
    assert not torch.allclose(got_t["head.weight"], sent["head.weight"])


@pytest.mark.parametrize("i", [0, 2])
def test_train_metrics_are_scalars_with_the_train_size(app, payload, heart_bundle, i) -> None:
    _ask(app, payload, i, with_file=True)
    metrics = _train(app, heart_bundle, payload, i).content.metric_records[rk.METRICS]
    assert metrics[rk.NUM_EXAMPLES] == SPLITS[i]["train"]
    assert all(isinstance(v, int | float) and not isinstance(v, bool)
               for v in metrics.values()), dict(metrics)
    assert math.isfinite(float(metrics["loss"]))  # type: ignore[arg-type]


def test_train_reply_names_the_site(app, payload, heart_bundle) -> None:
    _ask(app, payload, 3, with_file=True)
    reply = _train(app, heart_bundle, payload, 3)
    assert reply.content.config_records[rk.SITE][rk.SITE_NAME] == SITES[3]


def test_train_without_backbone_fails_with_backbone_missing(app, payload, heart_bundle) -> None:
    with pytest.raises(MissingBackbone) as err:
        _train(app, heart_bundle, payload, 0)
    assert str(err.value).startswith(rk.MISSING_BACKBONE)


def test_train_refuses_tensors_other_than_the_trainable_set(app, payload, heart_bundle) -> None:
    _ask(app, payload, 0, with_file=True)
    content = _round_content(heart_bundle, payload.sha256)
    name, tensor = sorted(load_bundle(heart_bundle).backbone.items())[-1]  # a real key
    content[rk.ARRAYS][name] = Array(tensor.numpy())
    with pytest.raises(ValueError, match=rf"unexpected \['{re.escape(name)}'\]"):
        call_client_app(app, "train", content, _node(0))


# --- evaluate ------------------------------------------------------------------------------
@pytest.mark.parametrize("i", range(4))
def test_evaluate_reports_validation_and_test_metrics(app, payload, heart_bundle, i) -> None:
    _ask(app, payload, i, with_file=True)
    reply = call_client_app(app, "evaluate", _round_content(heart_bundle, payload.sha256),
                            _node(i))
    metrics = reply.content.metric_records[rk.METRICS]
    assert metrics[rk.NUM_EXAMPLES] == SPLITS[i]["validation"]  # the weight: validation rows
    assert (metrics["val-n"], metrics["test-n"]) == (SPLITS[i]["validation"], SPLITS[i]["test"])
    assert reply.content.config_records[rk.SITE][rk.SITE_NAME] == SITES[i]
    for split in ("val", "test"):
        auc = float(metrics[f"{split}-auc"])  # type: ignore[arg-type]
        assert math.isnan(auc) or 0.0 <= auc <= 1.0  # NaN: a one-class split (Switzerland)
        assert 0.0 <= float(metrics[f"{split}-balanced_accuracy"]) <= 1.0  # type: ignore[arg-type]


# --- frozen-feature cache ------------------------------------------------------------------
def test_feature_cache_is_written_once_and_reused(app, payload, heart_bundle, settings,
                                                  monkeypatch) -> None:
    calls: list[int] = []
    real = client.node.frozen_features

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(client.node, "frozen_features", spy)
    _ask(app, payload, 1, with_file=True)
    cache_dir = settings.run_dir / "nodes" / "hungary" / "features"
    assert not cache_dir.exists()
    _train(app, heart_bundle, payload, 1)
    after_first = len(calls)
    files = sorted(cache_dir.glob("*.npz"))
    _train(app, heart_bundle, payload, 1)
    assert after_first == 1  # the training split, computed once
    assert len(calls) == after_first  # the second round reads the cache
    assert len(files) == 1 and sorted(cache_dir.glob("*.npz")) == files


def test_cached_features_give_the_same_update_as_fresh_ones(app, payload, heart_bundle) -> None:
    _ask(app, payload, 2, with_file=True)
    first = _train(app, heart_bundle, payload, 2).content.array_records[rk.ARRAYS]
    second = _train(app, heart_bundle, payload, 2).content.array_records[rk.ARRAYS]
    for name in HEAD_SHAPES:
        np.testing.assert_array_equal(first[name].numpy(), second[name].numpy())


def test_head_warmup_rounds_train_the_head_alone_then_the_trainable_set(
        signing_key, signing_key_path, tmp_path) -> None:
    # two backbone blocks: head+last-1 exchanges block 1 and the head and caches block 0's
    # features; the first 2 rounds must return block 1 as received and train the head on the
    # whole received backbone, then block 1 trains too
    two_blocks = ("model.hidden=[16,8]", "model.trainable=head+last-1")
    bundle_dir = tmp_path / "bundle"
    pretrain(load_config(HEART, [*FAST_PRETRAIN, *two_blocks]), bundle_dir, signing_key)
    settings = RunSettings(config_path=HEART, run_dir=tmp_path / "run", bundle=bundle_dir,
                           keys=signing_key_path,
                           overrides=(*two_blocks, "federation.head_warmup_rounds=2"))
    app = make_client_app(settings)
    payload = load_payload(bundle_dir)
    _ask(app, payload, 0, with_file=True)
    bundle = load_bundle(bundle_dir)
    sent = {**{n: t for n, t in bundle.backbone.items() if n.startswith("backbone.1.")},
            **bundle.head}
    changed = {}
    for server_round in (1, 2, 3):
        content = RecordDict({
            rk.ARRAYS: ArrayRecord(sent),
            rk.CONFIG: ConfigRecord({rk.SERVER_ROUND: server_round,
                                     rk.BACKBONE_SHA256: payload.sha256})})
        reply = call_client_app(app, "train", content, _node(0))
        got = reply.content.array_records[rk.ARRAYS].to_torch_state_dict()
        assert got.keys() == sent.keys()
        changed[server_round] = {n for n in sent if not torch.equal(got[n], sent[n])}
    assert changed[1] == changed[2] == {"head.weight", "head.bias"}
    assert changed[3] == set(sent)


# --- a hospital whose data does not match the model ----------------------------------------
def test_hospital_csv_missing_a_column_refuses_with_a_path_free_sentence(
        app, payload, heart_bundle, tmp_path, signing_pub_path) -> None:
    from client.node import DataRefused
    from tests.conftest import heart_csv_without

    csv = heart_csv_without("cleveland", "chol", tmp_path / "ward-7-oncology" / "cleveland.csv")
    workdir = tmp_path / "work"
    node = {"site-name": "cleveland", "data-path": str(csv), "workdir": str(workdir),
            "signing-pub": str(signing_pub_path)}
    content = RecordDict({rk.BUNDLE_META: payload.meta(), rk.BACKBONE_FILE: payload.arrays()})
    with pytest.raises(DataRefused) as err:  # already the first message: before any round
        call_client_app(app, f"query.{rk.QUERY_BACKBONE}", content, node)
    sent = str(err.value)
    assert sent.startswith(f"{rk.DATA_REFUSED}: ") and "chol" in sent
    assert "ward-7-oncology" not in sent  # the server never learns the file's path
    refused = __import__("json").loads((workdir / rk.DATA_REFUSED_FILE).read_text())
    assert "chol" in refused["reason"] and str(csv) in refused["reason"]


# --- save_model ----------------------------------------------------------------------------
def _save_model(app: ClientApp, heart_bundle: Path, claimed: int) -> Message:
    """The final model message, claiming `claimed` for the bundle signed in `heart_bundle`."""
    meta = ConfigRecord({rk.MANIFEST_JSON: (heart_bundle / "manifest.json").read_text(),
                         rk.MANIFEST_SIG: (heart_bundle / "manifest.sig").read_bytes().hex(),
                         rk.VERSION: claimed})
    head = np.frombuffer((heart_bundle / "head.safetensors").read_bytes(), dtype=np.uint8)
    content = RecordDict({rk.BUNDLE_META: meta,
                          rk.HEAD_FILE: ArrayRecord({rk.HEAD_FILE: Array(head)})})
    return call_client_app(app, f"query.{rk.QUERY_SAVE_MODEL}", content, _node(0))


def test_save_model_files_the_bundle_under_its_signed_version(app, payload, heart_bundle,
                                                              settings) -> None:
    _ask(app, payload, 0, with_file=True)
    signed = int(load_bundle(heart_bundle).manifest["version"])
    reply = _save_model(app, heart_bundle, signed)
    assert reply.content.metric_records[rk.METRICS]["saved-version"] == signed
    models = settings.run_dir / "nodes" / "cleveland" / "models"
    assert load_bundle(models / f"v{signed:04d}").manifest["version"] == signed


@pytest.mark.parametrize("claimed", [7, -1, 2**62])
def test_save_model_refuses_a_version_other_than_the_signed_one(app, payload, heart_bundle,
                                                                settings, claimed) -> None:
    # replaying an old signed model under a newer number would overwrite that newer model
    _ask(app, payload, 0, with_file=True)
    with pytest.raises(BundleError, match="version"):
        _save_model(app, heart_bundle, claimed)
    models = settings.run_dir / "nodes" / "cleveland" / "models"
    assert not models.exists() or not any(models.iterdir())


# --- what another party's text may do to the hospital's log --------------------------------
def _shown(settings: RunSettings, site: str = "cleveland") -> list[str]:
    """The hospital's log lines as `medfed client` shows them."""
    from client.events import EVENTS_FILE, line

    path = settings.run_dir / "nodes" / site / EVENTS_FILE
    return [line(__import__("json").loads(raw)) for raw in path.read_text().splitlines()]


def test_server_text_in_a_refused_manifest_reaches_the_log_without_control_characters(
        app, payload, settings) -> None:
    manifest = __import__("json").loads(payload.manifest_json)
    manifest["files"]["backbone.safetensors"] = "\x1b[2J\x1b[H\nFAKE ok"
    bad = BackbonePayload(payload.sha256, payload.file_bytes,
                          __import__("json").dumps(manifest), payload.manifest_sig)
    content = RecordDict({rk.BUNDLE_META: bad.meta(), rk.BACKBONE_FILE: bad.arrays()})
    with pytest.raises(BundleError, match="different hash") as err:
        call_client_app(app, f"query.{rk.QUERY_BACKBONE}", content, _node(0))
    assert "\x1b" not in str(err.value) and "\n" not in str(err.value)
    shown = _shown(settings)
    assert len(shown) == 1 and "different hash" in shown[0]
    assert all(c.isprintable() for c in shown[0]), repr(shown[0])


def test_many_unexpected_tensor_names_are_counted_not_copied(app, payload, heart_bundle,
                                                             settings) -> None:
    _ask(app, payload, 0, with_file=True)
    content = _round_content(heart_bundle, payload.sha256)
    for i in range(500):
        content[rk.ARRAYS][("x" * 200) + str(i)] = Array(np.zeros(1, dtype=np.float32))
    with pytest.raises(ValueError, match="500 unexpected") as err:
        call_client_app(app, "train", content, _node(0))
    assert len(str(err.value)) < 1000
    raw = (settings.run_dir / "nodes" / "cleveland" / "events.jsonl").read_text()
    assert max(len(line) for line in raw.splitlines()) < 2000
