"""A federation that fine-tunes a bundle on another task (PneumoniaMNIST -> BreastMNIST):
every version, site model and prediction names the federation's classes, not the
pretraining's; a task the bundle's model cannot learn is refused before anything runs."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.client_app import make_client_app
from client.model_card import model_card
from common.bundle import read_manifest
from common.config import ConfigError, DataConfig
from common.config_check import load_config
from common.data import DataError
from common.data.federated import declared_spec
from common.data.medmnist import load_medmnist_split
from common.manifest import spec_from_manifest, task_spec
from common.pretrain import pretrain
from medfed.cli import main
from server.federation import run_federation
from server.heldout import task_and_heldout
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings

BREAST = Path(__file__).resolve().parents[1] / "configs" / "breast.yaml"
TINY = ("model.channels=[4]", "pretrain.optim.epochs=1", "federation.rounds=1",
        "federation.local.steps=1")
BREAST_LABELS = ["normal/benign", "malignant"]


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


@pytest.fixture(scope="module")
def pneumonia_bundle(tmp_path_factory: pytest.TempPathFactory,
                     signing_key: Ed25519PrivateKey) -> Path:
    """configs/breast.yaml's pretraining (PneumoniaMNIST), one epoch of a tiny residual CNN."""
    out = tmp_path_factory.mktemp("pneumonia") / "pretrain"
    pretrain(load_config(BREAST, TINY), out, signing_key)
    return out


def test_the_pretraining_bundle_names_its_own_classes_and_dataset(
        pneumonia_bundle: Path) -> None:
    manifest = read_manifest(pneumonia_bundle)
    assert manifest["labels"] == ["normal", "pneumonia"]
    assert manifest["source"] == "medmnist/pneumonia:all:train"


def test_task_spec_takes_the_declared_labels_and_keeps_the_bundle_input(
        pneumonia_bundle: Path) -> None:
    manifest = read_manifest(pneumonia_bundle)
    breast = task_spec(manifest, declared_spec(DataConfig(source="medmnist", medmnist="breast")))
    assert list(breast.labels) == BREAST_LABELS
    own = spec_from_manifest(manifest)
    assert (breast.kind, breast.input_shape, breast.num_classes) == \
        (own.kind, own.input_shape, own.num_classes)
    assert task_spec(manifest, None) == own  # tabular sources: the bundle's schema rules
    assert declared_spec(DataConfig(source="heart")) is None


def test_a_task_of_other_classes_or_inputs_is_refused(pneumonia_bundle: Path) -> None:
    manifest = read_manifest(pneumonia_bundle)
    retina = declared_spec(DataConfig(source="medmnist", medmnist="retina"))
    with pytest.raises(DataError) as err:
        task_spec(manifest, retina)
    text = str(err.value)
    for part in ("'federation.data'", "5 classes", "(3, 28, 28)", "(1, 28, 28)",
                 "2 outputs (normal, pneumonia)", "pretrain a bundle"):
        assert part in text, (part, text)


def test_operator_class_names_are_checked_before_anything_starts(
        pneumonia_bundle: Path, signing_key_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["simulate", "--config", str(BREAST), "--set",
                 "federation.data.labels=[benign, malignant, other]",
                 "--bundle", str(pneumonia_bundle), "--keys", str(signing_key_path),
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "'federation.data.labels'" in err[0] and "3 classes" in err[0] \
        and "has 2 (normal/benign, malignant)" in err[0], err
    assert not out.exists()


def test_a_server_checks_operator_names_against_the_bundles_model(
        pneumonia_bundle: Path) -> None:
    # `medfed server` reads no hospital data: the count is checked against the model's outputs
    manifest = read_manifest(pneumonia_bundle)
    cfg = load_config(BREAST, ["federation.data.labels=[no lesion, lesion]"])
    assert task_and_heldout(cfg, manifest)[0].labels == ("no lesion", "lesion")
    cfg = load_config(BREAST, ["federation.data.labels=[a, b, c]"])
    with pytest.raises(DataError) as err:
        task_and_heldout(cfg, manifest)
    assert "'federation.data.labels' names 3 classes (a, b, c) but the bundle's model has 2 " \
        "(normal/benign, malignant)" in str(err.value)


@pytest.mark.parametrize(("value", "part"), [
    ("[benign, benign]", "names class 'benign' twice"),
    ("['', malignant]", "'federation.data.labels[0]'"),
    ("[benign, 7]", "'federation.data.labels[1]'"),
])
def test_bad_class_names_are_refused_when_the_config_is_read(value: str, part: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(BREAST, [f"federation.data.labels={value}"])
    assert part in str(err.value), str(err.value)


def test_pretraining_names_the_bundles_classes_as_told(tmp_path: Path,
                                                       signing_key: Ed25519PrivateKey) -> None:
    out = tmp_path / "pretrain"
    pretrain(load_config(BREAST, (*TINY, "pretrain.data.labels=[clear, opacity]")), out,
             signing_key)
    assert read_manifest(out)["labels"] == ["clear", "opacity"]


def test_medfed_simulate_refuses_that_task_before_anything_starts(
        pneumonia_bundle: Path, signing_key_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["simulate", "--config", str(BREAST), "--set", "federation.data.medmnist=retina",
                 "--bundle", str(pneumonia_bundle), "--keys", str(signing_key_path),
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "'federation.data'" in err[0] and "5 classes" in err[0], err
    assert not out.exists()


# the operator's names (`federation.data.labels`) win: hospitals bringing their own images
# for a new task declare no names, and the pretraining's would be wrong for it
OWN_LABELS = ["no lesion", "lesion"]


@pytest.mark.parametrize("labels", [BREAST_LABELS, OWN_LABELS], ids=["medmnist", "operator"])
def test_a_breast_federation_publishes_breast_labels_everywhere(
        pneumonia_bundle: Path, signing_key_path: Path, signing_pub_path: Path,
        tmp_path: Path, labels: list[str]) -> None:
    run_dir = tmp_path / "run"
    extra = () if labels == BREAST_LABELS else (f"federation.data.labels=[{', '.join(labels)}]",)
    settings = run_settings(BREAST, (*TINY, *extra), run_dir, pneumonia_bundle,
                            signing_key_path)
    grid = InProcessGrid(make_client_app(settings), 5)  # type: ignore[arg-type]
    run_federation(grid, settings)
    for version in ("v0000", "v0001"):
        assert read_manifest(run_dir / "registry" / version)["labels"] == labels
    site_models = sorted((run_dir / "nodes").glob("*/personalised"))
    assert len(site_models) == 5
    for site_model in site_models:
        assert read_manifest(site_model)["labels"] == labels
    # what a clinician reads: the prediction columns name breast-ultrasound classes
    images = tmp_path / "images.npy"
    np.save(images, load_medmnist_split("breast", "test")[0][:4])
    predictions = tmp_path / "predictions.csv"
    assert main(["predict", "--model", str(site_models[0]), "--data", str(images), "--out",
                 str(predictions), "--public-key", str(signing_pub_path)]) == 0
    with predictions.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert set(rows[0]) >= {f"p_{name}" for name in labels}
    assert {r["predicted"] for r in rows} <= set(labels)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["final"]["version"] in (0, 1)
    card = model_card(site_models[0], signing_pub_path)
    assert f"2 classes ({labels[0]}, {labels[1]})" in card
    assert "**Positive class** (what sensitivity, p(positive) and the threshold refer to): " \
        f"{labels[1]}" in card
    assert "medmnist/pneumonia:all:train" in card


def test_a_model_card_names_the_validation_set_that_picked_best() -> None:
    """A version checked on the pretraining cohort's split read like one checked at the
    sites: 'validation (picks `best`)' alone."""
    from client.model_card import _metrics_rows

    rows = _metrics_rows({"validation": {"auc": 0.8, "n": 10,
                                         "source": "the operator's file a|b.csv"}})
    assert rows[0].startswith("| validation (picks `best`): the operator's file a\\|b.csv | 10 |")
