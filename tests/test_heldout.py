"""The server's check of every global model (`federation.heldout`): never a test split.

Runs the real ServerApp and ClientApp code in this process (no Ray) on the heart hospitals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client.client_app import make_client_app
from common.data.heart import FLAMBY_DROPPED, flamby_split, heart_schema, read_site
from server.federation import run_federation
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings

FAST = ("federation.rounds=2", "federation.local.steps=2", "federation.adaptation.enabled=false")


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def _run(tmp: Path, bundle: Path, keys: Path, *overrides: str) -> tuple[Path, list[dict]]:
    settings = run_settings(HEART, (*FAST, *overrides), tmp / "run", bundle, keys)
    grid = InProcessGrid(make_client_app(settings), 4)
    run_federation(grid, settings)
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp / "run", rows


def test_validation_mode_checks_round_0_at_the_sites_and_aggregates_by_rows(
        tmp_path, heart_bundle, signing_key_path) -> None:
    run, rows = _run(tmp_path, heart_bundle, signing_key_path)
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "evaluate" for e in audit) == 4 * 3  # rounds 0, 1 and 2
    for r in rows:
        sites = r["sites"]
        n = sum(s["validation"]["n"] for s in sites.values())
        assert r["validation"]["n"] == n
        mean = sum(s["validation"]["n"] * s["validation"]["balanced_accuracy"]
                   for s in sites.values()) / n
        assert r["validation"]["balanced_accuracy"] == pytest.approx(mean, abs=1e-12)
    best = json.loads((run / "registry" / "best.json").read_text())
    assert best["split"] == "validation" and "sites' validation splits" in best["source"]


def test_source_validation_is_the_pretraining_cohorts_validation_split(
        tmp_path, heart_bundle, signing_key_path) -> None:
    run, rows = _run(tmp_path, heart_bundle, signing_key_path,
                     "federation.heldout=source-validation")
    # Cleveland's FLamby train split (199 rows) less what pretraining trained on
    manifest = json.loads((heart_bundle / "manifest.json").read_text())
    assert all(r["validation"]["n"] == manifest["metrics"]["source-validation"]["n"]
               for r in rows)
    assert manifest["metrics"]["source-validation"]["n"] + \
        manifest["metrics"]["source-train"]["n"] == 199
    assert "pretraining cohort" in json.loads((run / "registry" / "best.json").read_text())[
        "source"]


def _labelled_file(path: Path, site: str = "hungary") -> int:
    schema = heart_schema("flamby")
    df = read_site(site).drop(columns=list(FLAMBY_DROPPED)).dropna().reset_index(drop=True)
    rows, _ = flamby_split((df["num"] > 0).to_numpy(), 43)
    df.iloc[rows][[c.name for c in schema.columns] + ["num"]].to_csv(path, index=False)
    return len(rows)


def test_an_operators_file_checks_every_global_model(tmp_path, heart_bundle,
                                                     signing_key_path) -> None:
    path = tmp_path / "operator.csv"
    n = _labelled_file(path)
    run, rows = _run(tmp_path, heart_bundle, signing_key_path, f"federation.heldout=file:{path}",
                     "federation.strategy.fraction_evaluate=0")
    assert [r["validation"]["n"] for r in rows] == [n, n, n]
    assert all(r["sites"] == {} for r in rows)  # no federated evaluation was asked for
    assert str(path) in json.loads((run / "registry" / "best.json").read_text())["source"]


def test_round_0_needs_no_federated_evaluation_outside_validation_mode(
        tmp_path, heart_bundle, signing_key_path) -> None:
    path = tmp_path / "operator.csv"
    _labelled_file(path)
    run, _ = _run(tmp_path, heart_bundle, signing_key_path, f"federation.heldout=file:{path}")
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "evaluate" for e in audit) == 4 * 2  # rounds 1 and 2 only


def test_validation_mode_refuses_to_run_without_federated_evaluation() -> None:
    from common.config import ConfigError
    from common.config_check import load_config

    with pytest.raises(ConfigError, match="fraction_evaluate.*is 0 but 'federation.heldout'"):
        load_config(HEART, ["federation.strategy.fraction_evaluate=0"])


def test_the_weighted_median_stays_within_the_majoritys_values() -> None:
    from server.heldout import aggregate_sites, weighted_median

    assert weighted_median([(0.7, 1), (0.9, 1)]) == pytest.approx(0.8)  # equal weights: usual
    assert weighted_median([(0.7, 3), (0.9, 1), (0.8, 1)]) == 0.7
    rng = np.random.default_rng(0)
    for _ in range(200):
        honest = [(float(v), float(w)) for v, w in zip(rng.uniform(0.6, 0.8, 4),
                                                        rng.uniform(1, 10, 4), strict=True)]
        lie = sum(w for _, w in honest) * float(rng.uniform(0, 0.99))  # under half in all
        for value in (0.0, 1.0):
            m = weighted_median([*honest, (value, lie)])
            assert min(v for v, _ in honest) <= m <= max(v for v, _ in honest)
    sites = [{"auc": 0.9, "n": 10, "positives": 4}, {"auc": 0.6, "n": 30, "positives": 9},
             {"auc": float("nan"), "n": 50, "positives": 0}]  # undefined: left out
    assert aggregate_sites(sites, "median") == {"auc": 0.6, "n": 90, "positives": 13}
    assert aggregate_sites(sites)["auc"] == pytest.approx((0.9 * 10 + 0.6 * 30) / 40)
