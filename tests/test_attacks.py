"""A malicious hospital cannot hurt the federation (`federation.faults.attack`).

The real ServerApp and ClientApp code in this process (no Ray), heart hospitals, with the
enrolment `medfed simulate` writes (each site's training rows). Every attack ends as an
excluded or bounded reply with a logged reason; none stops the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.client_app import make_client_app
from common.config_check import load_config
from common.data.federated import raw_sites
from common.registry import Registry
from server.federation import run_federation
from server.simulate import enrol_simulated
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import InProcessGrid, run_settings

FAST = ("federation.rounds=3", "federation.local.steps=10", "federation.adaptation.enabled=false",
        "federation.final_model=latest")


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


def _run(tmp: Path, name: str, bundle: Path, keys: Path, *overrides: str,
         enrol: bool = True) -> dict[str, Any]:
    run = tmp / name
    settings = run_settings(HEART, (*FAST, *overrides), run, bundle, keys)
    if enrol:
        cfg = load_config(HEART, [*FAST, *overrides])
        enrol_simulated(run, raw_sites(cfg.federation.data, cfg.seed)[1])
    run_federation(InProcessGrid(make_client_app(settings), 4), settings)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    return {"run": run, "rows": rows, "audit": audit, "summary": summary}


def _attack(fraction: float, kind: str, value: float = 1e300) -> tuple[str, ...]:
    return (f"federation.faults.attack={kind}", f"federation.faults.attack_fraction={fraction}",
            f"federation.faults.attack_value={value}")


def _head(run: Path, version: int) -> bytes:
    return (Registry(run / "registry").version_dir(version) / "head.safetensors").read_bytes()


@pytest.fixture(scope="module")
def clean(tmp_path_factory, heart_bundle, signing_key_path) -> dict[str, Any]:
    with task_identity():
        return _run(tmp_path_factory.mktemp("clean"), "clean", heart_bundle, signing_key_path)


@pytest.mark.parametrize(("fraction", "value"), [(0.25, 1e300), (0.5, 1e308)])
def test_inflated_counts_leave_the_global_model_as_the_clean_one(
        clean, tmp_path, heart_bundle, signing_key_path, fraction, value) -> None:
    attacked = _run(tmp_path, "inflated", heart_bundle, signing_key_path,
                    *_attack(fraction, "inflate-count", value))
    accuracy = [r["validation"]["accuracy"] for r in attacked["rows"]]
    assert abs(accuracy[-1] - clean["rows"][-1]["validation"]["accuracy"]) <= 0.02
    # the weights are bounded by each site's enrolled size, so it is exactly the clean model
    assert _head(attacked["run"], 3) == _head(clean["run"], 3)


def test_without_enrolment_an_inflated_count_is_bounded_by_the_round_median(
        tmp_path, heart_bundle, signing_key_path, caplog) -> None:
    caplog.set_level("WARNING", logger="medfed.server")
    out = _run(tmp_path, "median", heart_bundle, signing_key_path,
               *_attack(0.25, "inflate-count"), enrol=False)
    assert len(out["rows"]) == 4
    assert "capped the weight of" in caplog.text and "the bound is" in caplog.text


@pytest.mark.parametrize(("kind", "reason"), [
    ("huge-update", "exceeds the bound 1000"),
    ("nan-update", "NaN or infinite"),
    ("omit-count", "reply has no 'num-examples'"),
])
def test_each_bad_update_is_excluded_with_a_reason_and_the_run_finishes(
        tmp_path, heart_bundle, signing_key_path, kind, reason) -> None:
    out = _run(tmp_path, kind, heart_bundle, signing_key_path, *_attack(0.25, kind, 3e38))
    assert [r["round"] for r in out["rows"]] == [0, 1, 2, 3]
    excluded = [e for e in out["audit"] if "excluded" in e and e["type"] == "train"]
    assert len(excluded) == 3 and all(reason in e["excluded"] for e in excluded)
    assert all(reason in next(iter(r["excluded"].values())) for r in out["rows"][1:])
    for r in out["rows"]:
        assert all(isinstance(v, float) and v == v for k, v in r["validation"].items()
                   if k in ("accuracy", "auc", "loss"))


def test_a_spoofed_name_is_not_taken_over(tmp_path, heart_bundle, signing_key_path,
                                          caplog) -> None:
    caplog.set_level("WARNING", logger="medfed.server")
    out = _run(tmp_path, "spoof", heart_bundle, signing_key_path, *_attack(0.25, "spoof-name"))
    names = set(out["rows"][-1]["sites"])
    assert len(names) == 4  # four nodes, four distinct names
    assert any("~" in n for n in names)
    assert "two hospitals call themselves" in caplog.text


def test_a_hospital_sending_malformed_replies_is_kept_out_not_fatal(
        tmp_path, heart_bundle, signing_key_path) -> None:
    out = _run(tmp_path, "malformed", heart_bundle, signing_key_path,
               *_attack(0.25, "malformed"))
    excluded = [e for e in out["audit"] if "excluded" in e]
    assert excluded and {e["type"] for e in excluded} == {"query.backbone"}
    assert {e["excluded"] for e in excluded} == {"reply has no metrics record"}
    assert [r["round"] for r in out["rows"]] == [0, 1, 2, 3]
    assert len(out["rows"][-1]["sites"]) == 3  # the three honest sites' validation metrics


@pytest.mark.parametrize(("fill", "fragment"), [(float("nan"), "NaN or infinite"),
                                                (1e6, "moved by")])
def test_an_absurd_aggregate_is_never_published(tmp_path, heart_bundle, signing_key_path,
                                                fill, fragment) -> None:
    import torch
    from flwr.app import ArrayRecord

    from server.federation import prepare
    from server.provisioning import RunStopped

    settings = run_settings(HEART, FAST, tmp_path / "run", heart_bundle, signing_key_path)
    fed = prepare(InProcessGrid(make_client_app(settings), 4), settings)
    state = fed.model.state_dict()
    good = ArrayRecord({n: state[n].detach().clone() for n in fed.trainable})
    fed.evaluate_round(0, good)  # round 0: the pretrained model, published
    bad = ArrayRecord({n: torch.full_like(state[n], fill) for n in fed.trainable})
    with pytest.raises(RunStopped, match=fragment):
        fed.evaluate_round(1, bad)
    assert fed.registry.versions() == [0]


def test_a_hospital_whose_csv_lacks_a_column_leaves_and_the_run_goes_on(
        tmp_path, heart_bundle, signing_key_path, signing_pub_path, caplog) -> None:
    from server.provisioning import Enrolment
    from tests.conftest import heart_csv_without

    csv = heart_csv_without("va", "chol", tmp_path / "va.csv")
    caplog.set_level("WARNING", logger="medfed.server")
    run = tmp_path / "run"
    settings = run_settings(HEART, FAST, run, heart_bundle, signing_key_path)
    grid = InProcessGrid(make_client_app(settings), 4)
    va = max(grid.contexts)
    grid.contexts[va].node_config.clear()
    grid.contexts[va].node_config.update({
        "site-name": "va", "data-path": str(csv), "workdir": str(tmp_path / "va-work"),
        "signing-pub": str(signing_pub_path)})
    # as `medfed server` does: the operator's names by node id (the refusal carries none)
    names = ("cleveland", "hungary", "switzerland", "va")
    Enrolment(names=dict(zip(sorted(grid.contexts), names, strict=True))).write(run)
    run_federation(grid, settings)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[-1]["sites"]) == {"cleveland", "hungary", "switzerland"}
    said = [r.getMessage() for r in caplog.records if " left: " in r.getMessage()]
    assert said == ["va left: its data does not match the model's schema "
                    "(its data file: missing column(s) 'chol')"]
    assert str(tmp_path) not in caplog.text  # the server never sees the hospital's path
    # once it left, nothing more is sent to it
    sent_to_va = [m.metadata.message_type for m in grid.received
                  if m.metadata.src_node_id == va]
    assert sent_to_va == ["query.backbone"] * len(sent_to_va) and len(sent_to_va) <= 2
