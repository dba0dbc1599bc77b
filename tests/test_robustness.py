"""Robust aggregation, reply validation and dropouts, on Flower's simulation runtime.

Ten simulated hospitals share the pooled heart training data (IID). The yardstick is the
server's check on a fixed labelled file (`federation.heldout=file:...`, here the rows of
FLamby's four test splits), so runs compare on the same 254 rows without federated
evaluation rounds; the last round's model is compared (`final_model=latest`). Misbehaviour
comes from `federation.faults` (simulation-only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from common.data.heart import FLAMBY_DROPPED, SITE_FILES, flamby_split, heart_schema, read_site

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# small local steps and no federated evaluation keep rounds short and the curve smooth
BASE = ["--hospitals", "10", "--partition", "iid", "--rounds", "20",
        "--set", "federation.adaptation.enabled=false", "--set", "federation.strategy.min_nodes=2",
        "--set", "federation.local.steps=20", "--set", "federation.local.lr=0.01",
        "--set", "federation.strategy.fraction_evaluate=0",
        "--set", "federation.final_model=latest", "--cpus-per-client", "0.25"]


@pytest.fixture(scope="module")
def yardstick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw rows of FLamby's four heart test splits, as an operator's labelled CSV."""
    schema = heart_schema("flamby")
    columns = [c.name for c in schema.columns] + [schema.label]
    frames = []
    for site in SITE_FILES:
        df = read_site(site).drop(columns=list(FLAMBY_DROPPED)).dropna().reset_index(drop=True)
        _, test = flamby_split((df[schema.label] > 0).to_numpy(), 43)
        frames.append(df.iloc[test][columns])
    path = tmp_path_factory.mktemp("yardstick") / "heart-test-rows.csv"
    pd.concat(frames).to_csv(path, index=False, float_format="%g")
    return path


def simulate(tmp: Path, bundle: Path, home: Path, name: str, *extra: str,
             yardstick: Path) -> dict:
    out = tmp / name
    result = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "simulate", "--config",
         str(ROOT / "configs" / "heart.yaml"), "--bundle", str(bundle), "--out", str(out),
         *BASE, "--set", f"federation.heldout=file:{yardstick}", *extra],
        capture_output=True, text=True, timeout=420, env={**os.environ, "MEDFED_HOME": str(home)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    summary["log"] = result.stdout + result.stderr
    summary["run_dir"] = out
    return summary


def accuracy(summary: dict) -> float:
    return float(summary["validation"]["accuracy"])


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("robust")


@pytest.fixture(scope="module")
def clean_median(runs_dir: Path, heart_bundle: Path, medfed_home: Path,
                 yardstick: Path) -> dict:
    return simulate(runs_dir, heart_bundle, medfed_home, "clean-median",
                    "--set", "federation.strategy.name=fedmedian", yardstick=yardstick)


@pytest.fixture(scope="module")
def clean_fedavg(runs_dir: Path, heart_bundle: Path, medfed_home: Path,
                 yardstick: Path) -> dict:
    return simulate(runs_dir, heart_bundle, medfed_home, "clean-fedavg", yardstick=yardstick)


# Sign-flipped updates of honest magnitude look like any other update of a small IID site, so
# no aggregator can drop them; they pull the optimum towards the flipped sites' "anti-data".
# Measured with median, trimmed mean (0.2) and MultiKrum: 0.03-0.06 accuracy lost after 12-40
# rounds, so the 0.02 bound is asserted for scaled updates only (docs/reliability.md).
@pytest.mark.parametrize(("mode", "tolerance"), [("scale", 0.02)])
def test_median_resists_20_percent_byzantine(mode: str, tolerance: float, clean_median: dict,
                                             runs_dir: Path, heart_bundle: Path,
                                             medfed_home: Path, yardstick: Path) -> None:
    attacked = simulate(
        runs_dir, heart_bundle, medfed_home, f"median-{mode}",
        "--set", "federation.strategy.name=fedmedian",
        "--set", "federation.faults.byzantine_fraction=0.2",
        "--set", f"federation.faults.byzantine_mode={mode}",
        "--set", "federation.validation.max_norm_ratio=0",  # the strategy alone must cope
        yardstick=yardstick)
    # the attack must not cost more than `tolerance` (a median that drops the extreme updates
    # may land a little above the clean run: seen +0.024 on these 254 rows)
    assert accuracy(attacked) >= accuracy(clean_median) - tolerance


def test_fedavg_is_damaged_by_scaled_updates(clean_fedavg: dict, runs_dir: Path,
                                             heart_bundle: Path, medfed_home: Path,
                                             yardstick: Path) -> None:
    attacked = simulate(
        runs_dir, heart_bundle, medfed_home, "fedavg-scale",
        "--set", "federation.faults.byzantine_fraction=0.2",
        "--set", "federation.validation.max_norm_ratio=0",  # no reply validation
        yardstick=yardstick)
    assert accuracy(attacked) < accuracy(clean_fedavg) - 0.1


def test_30_percent_failing_hospitals_do_not_stop_the_run(
        clean_fedavg: dict, runs_dir: Path, heart_bundle: Path, medfed_home: Path,
        yardstick: Path) -> None:
    # each round a new 30% fails: a third of them raise, a third answer after the round
    # timeout (their replies are dropped), a third never answer
    faulty = simulate(runs_dir, heart_bundle, medfed_home, "fail-mixed",
                      "--set", "federation.faults.fail_fraction=0.3",
                      "--set", "federation.faults.fail_mode=mixed",
                      "--set", "federation.faults.hang_seconds=12",
                      "--set", "federation.strategy.round_timeout=10", yardstick=yardstick)
    assert faulty["rounds"] == 20
    assert "replied with an error" in faulty["log"]
    assert abs(accuracy(faulty) - accuracy(clean_fedavg)) <= 0.01
