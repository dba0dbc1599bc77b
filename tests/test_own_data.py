"""A hospital's own CSVs end to end, in this process (the real ServerApp and ClientApp code):
test files kept aside, missing cells, site models that carry their statistics.

- `medfed evaluate` of each site's model on that site's test file gives exactly the metrics
  medfed reported for it (1e-9), for `normalisation: site` and `bundle`;
- permuting every test label leaves `best`, every version's weights and every site model
  byte-for-byte the same: the test split chooses nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from client.client_app import make_client_app
from client.evaluate import evaluate_file
from common.config_check import load_config
from common.data.heart import SITE_FILES, export_site_csv
from common.pretrain import pretrain
from common.signing import load_or_create_signing_key, load_public_key
from server.federation import run_federation
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings

SITES = tuple(SITE_FILES)
PROJECT = Path(__file__).resolve().parents[1]
FAST = {"rounds": 2, "local": {"steps": 5}}
BLANKED = ("chol", 0.10)  # one column's cells blanked in 10% of the rows


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def _blank(path: Path, column: str, share: float, seed: int) -> None:
    df = pd.read_csv(path)
    rows = np.random.default_rng(seed).random(len(df)) < share
    df[column] = df[column].astype(object)
    df.loc[rows, column] = ""
    df.to_csv(path, index=False)


@pytest.fixture(scope="module")
def hospital_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four heart hospitals as CSVs with their test files apart; chol blanked in 10%."""
    root = tmp_path_factory.mktemp("own-data")
    for i, site in enumerate(SITES):
        export_site_csv(site, root / "heart" / f"{site}.csv",
                        test_out=root / "heart-test" / f"{site}.csv")
        for folder in ("heart", "heart-test"):
            _blank(root / folder / f"{site}.csv", *BLANKED, seed=i)
    schema = yaml.safe_load((PROJECT / "common/datasets/heart_disease/schema.yaml").read_text())
    schema["columns"] = [c for c in schema["columns"] if c["name"] not in ("slope", "ca", "thal")]
    for col in schema["columns"]:
        if col["name"] == "chol":
            col["missing"] = "median"
            col["missing_indicator"] = True
    (root / "schema.yaml").write_text(yaml.safe_dump(schema), encoding="utf-8")
    return root


def _config(root: Path, name: str, **federation: Any) -> Path:
    """configs/own-data.yaml with absolute paths, short rounds and `federation` overrides."""
    cfg = yaml.safe_load((PROJECT / "configs" / "own-data.yaml").read_text())
    schema = str(root / "schema.yaml")
    cfg["pretrain"]["data"].update(csv_schema=schema,
                                   csv_paths=[str(root / "heart" / "cleveland.csv")],
                                   test_paths=[str(root / "heart-test" / "cleveland.csv")])
    cfg["pretrain"]["optim"]["epochs"] = 3
    fed = cfg["federation"]
    fed["data"].update(csv_schema=schema,
                       csv_paths=[str(root / "heart" / f"{s}.csv") for s in SITES],
                       test_paths=[str(root / "heart-test" / f"{s}.csv") for s in SITES])
    for key, value in {**FAST, **federation}.items():
        if isinstance(value, dict):
            fed.setdefault(key, {}).update(value)
        else:
            fed[key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _run(root: Path, config: Path, run: Path, keys: Path) -> dict[str, Any]:
    cfg = load_config(config)
    bundle = run / "pretrain"
    pretrain(cfg, bundle, load_or_create_signing_key(keys)[0])
    settings = run_settings(config, (), run, bundle, keys)
    with task_identity():  # module-scoped fixtures run outside the autouse one
        run_federation(InProcessGrid(make_client_app(settings), len(SITES)), settings)
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module", params=["site", "bundle"])
def finished(request: pytest.FixtureRequest, hospital_files: Path, signing_key_path: Path
             ) -> tuple[Path, dict[str, Any], str]:
    mode = request.param
    config = _config(hospital_files, f"run-{mode}", data={"normalisation": mode})
    run = hospital_files / f"run-{mode}"
    return run, _run(hospital_files, config, run, signing_key_path), mode


def _same(reported: dict[str, Any], evaluated: dict[str, Any]) -> None:
    keys = [k for k, v in reported.items() if isinstance(v, int | float) or v is None]
    keys = [k for k in keys if k in evaluated]
    assert len(keys) >= 12, keys
    for key in keys:
        if reported[key] is None:
            assert evaluated[key] is None, key
        else:
            assert evaluated[key] == pytest.approx(reported[key], abs=1e-9, rel=0), key


def test_evaluating_each_site_model_on_its_test_file_gives_the_reported_metrics(
        finished, hospital_files, signing_pub_path) -> None:
    run, summary, _ = finished
    for site in SITES:
        report, _, _ = evaluate_file(run / "nodes" / site / "personalised",
                                     hospital_files / "heart-test" / f"{site}.csv",
                                     public_key=signing_pub_path)
        _same(summary["site_models"][site]["site_model"]["test"], report["metrics"])
        counts = report["confusion_matrix"]["counts"]
        answered = {j for row in counts for j, c in enumerate(row) if c}
        classes = [row for row in counts if sum(row)]
        assert report["constant_predictor"] == (len(classes) > 1 and len(answered) < 2)


def test_evaluating_the_delivered_global_model_gives_the_reported_site_metrics(
        finished, hospital_files, signing_pub_path) -> None:
    run, summary, mode = finished
    version = summary["final"]["version"]
    for site in SITES:
        models = run / "nodes" / site / "models"
        stats = models / "site_stats.json" if mode == "site" else None
        report, _, _ = evaluate_file(models / f"v{version:04d}",
                                     hospital_files / "heart-test" / f"{site}.csv",
                                     site_stats=stats, public_key=signing_pub_path)
        _same(summary["sites"][site]["test"], report["metrics"])


def test_missing_cells_are_imputed_and_flagged_from_each_sites_training_split(
        finished) -> None:
    run, summary, mode = finished
    stats = json.loads((run / "nodes" / "hungary" / "personalised" / "site_stats.json")
                       .read_text())
    manifest = json.loads((run / "nodes" / "hungary" / "personalised" / "manifest.json")
                          .read_text())
    names = manifest["preprocessing"]["feature_names"]
    assert "chol:missing" in names
    fill = stats["fill"][names.index("chol")]
    assert fill is not None and 85 <= fill <= 603  # a cholesterol value, in mg/dl
    assert summary["sites"]["hungary"]["test"]["n"] == 89


def test_a_pulled_global_model_needs_site_statistics_only_when_normalised_per_site(
        finished, hospital_files, signing_pub_path) -> None:
    from common.data.schema import DataError

    run, summary, mode = finished
    pulled = hospital_files / f"pulled-{mode}"  # no site_stats.json beside it
    shutil.copytree(run / "registry" / f"v{summary['final']['version']:04d}", pulled)
    data = hospital_files / "heart-test" / "va.csv"
    if mode == "site":
        with pytest.raises(DataError, match=r"--site-stats FILE"):
            evaluate_file(pulled, data, public_key=signing_pub_path)
    else:  # the bundle's own statistics apply everywhere
        report, _, _ = evaluate_file(pulled, data, public_key=signing_pub_path)
        assert report["statistics"] == "the bundle's statistics"


def test_site_models_are_signed_and_a_changed_statistic_is_refused(
        finished, tmp_path, signing_pub_path) -> None:
    from common.bundle import BundleError, load_bundle

    run, _, _ = finished
    model = tmp_path / "site-model"
    shutil.copytree(run / "nodes" / "va" / "personalised", model)
    manifest = load_bundle(model, load_public_key(signing_pub_path),
                           require_signature=True).manifest
    assert manifest["site"]["name"] == "va"
    stats = json.loads((model / "site_stats.json").read_text())
    stats["mean"][0] += 1.0
    (model / "site_stats.json").write_text(json.dumps(stats))
    with pytest.raises(BundleError, match="site_stats.json has sha256"):
        load_bundle(model, load_public_key(signing_pub_path), require_signature=True)


def _permute_test_labels(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    for i, site in enumerate(SITES):
        path = dst / "heart-test" / f"{site}.csv"
        df = pd.read_csv(path, keep_default_na=False, dtype=str)
        df["num"] = np.random.default_rng(i).permutation(df["num"].to_numpy())
        df.to_csv(path, index=False)


def _weights(run: Path) -> dict[str, bytes]:
    """Every weight and statistics file the run produced, by relative path."""
    out = {}
    for path in sorted(run.rglob("*")):
        if path.name in ("backbone.safetensors", "head.safetensors", "site_stats.json") \
                and "backbones" not in path.parts:
            out[str(path.relative_to(run))] = path.read_bytes()
    return out


def test_permuting_every_test_label_changes_no_choice_and_no_weight(
        hospital_files, tmp_path, signing_key_path) -> None:
    adapted = {"adaptation": {"enabled": True, "steps": 10, "eval_every": 2},
               "operating_point": {"threshold": "youden"}}
    runs = []
    for name, root in (("true", hospital_files), ("permuted", tmp_path / "permuted")):
        if name == "permuted":
            _permute_test_labels(hospital_files, root)
        config = _config(root, f"perm-{name}", **adapted)
        run = tmp_path / f"run-{name}"
        runs.append((run, _run(root, config, run, signing_key_path)))
    (a, sa), (b, sb) = runs
    assert sa["test"] != sb["test"]  # the labels did change what is reported
    best = [json.loads((r / "registry" / "best.json").read_text()) for r in (a, b)]
    assert best[0] == best[1]
    assert sa["final"] == sb["final"]
    wa, wb = _weights(a), _weights(b)
    assert len(wa) > 10 and wa == wb
    for site in SITES:
        keep = ("kept", "method", "steps", "operating_point")
        assert {k: sa["site_models"][site][k] for k in keep} == \
            {k: sb["site_models"][site][k] for k in keep}


def test_a_model_answering_one_class_for_every_row_is_flagged_in_the_report() -> None:
    from client.evaluate import format_report

    report = {"model": "m", "site": None, "version": 3, "data": "d.csv", "rows": 10,
              "operating_point": {"threshold": 0.5}, "statistics": "bundle",
              "metrics": {"accuracy": 0.8, "auc": 0.5}, "intervals_95": {},
              "confusion_matrix": {"rows_true_columns_predicted": ["healthy", "disease"],
                                   "counts": [[0, 2], [0, 8]]},
              "constant_predictor": True}
    assert format_report(report).splitlines()[-1] == (
        "WARNING: the model answers disease for every row: a constant predictor, useless for "
        "diagnosis whatever its accuracy.")
    assert "WARNING" not in format_report({**report, "constant_predictor": False})
