"""Too few valid updates: the round is retried once, then the run stops with a clear reason.

Runs the real ServerApp code against the real ClientApp in this process (no Ray).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.client_app import make_client_app
from server.federation import run_federation
from server.provisioning import RunStopped
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings

FAST = ("federation.rounds=2", "federation.local.steps=2",
        "federation.adaptation.enabled=false")


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def _run(tmp_path: Path, heart_bundle: Path, keys: Path, *overrides: str) -> Path:
    settings = run_settings(HEART, (*FAST, *overrides), tmp_path / "run", heart_bundle, keys)
    grid = InProcessGrid(make_client_app(settings), 4)
    run_federation(grid, settings)
    return settings.run_dir


def test_run_stops_when_every_hospital_fails(tmp_path: Path, heart_bundle: Path,
                                             signing_key_path: Path) -> None:
    with pytest.raises(RunStopped, match=r"round 1: only 0 valid updates, at least 1 needed"):
        _run(tmp_path, heart_bundle, signing_key_path,
             "federation.faults.fail_fraction=1.0", "federation.faults.fail_mode=raise")
    # round 0 (the pretrained model) was committed; nothing of round 1 was
    registry = tmp_path / "run" / "registry"
    assert sorted(p.name for p in registry.iterdir() if p.name.startswith("v")) == ["v0000"]


def test_too_few_valid_updates_retries_then_stops(tmp_path: Path, heart_bundle: Path,
                                                  signing_key_path: Path) -> None:
    # one of four hospitals fails in round 1 and its retry; four valid updates are required
    with pytest.raises(RunStopped, match=r"only 3 valid updates, at least 4 needed"):
        _run(tmp_path, heart_bundle, signing_key_path,
             "federation.faults.fail_fraction=0.25", "federation.faults.fail_mode=raise",
             "federation.validation.min_valid_replies=4")
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text()
             .splitlines()]
    train_errors = [e for e in audit if e["type"] == "train" and "error" in e]
    assert len(train_errors) == 2  # the round and its one retry
    # each entry names the hospital and the federation round (None outside the rounds)
    assert {e["round"] for e in train_errors} == {1}
    assert len({e["site"] for e in train_errors}) == 1
    # (a first backbone query is answered before the hospital has said its name)
    assert {e["site"] for e in audit if not e["type"].startswith("query.")} == {
        "cleveland", "hungary", "switzerland", "va"}
    assert {e["round"] for e in audit if e["type"] == "evaluate"} == {0}
    assert {e["round"] for e in audit if e["type"].startswith("query.")} == {None}


def test_enough_valid_updates_finish_the_run(tmp_path: Path, heart_bundle: Path,
                                             signing_key_path: Path) -> None:
    run_dir = _run(tmp_path, heart_bundle, signing_key_path,
                   "federation.faults.fail_fraction=0.25", "federation.faults.fail_mode=raise",
                   "federation.validation.min_valid_replies=3")
    rounds = [json.loads(line)["round"] for line in
              (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
