"""Run history: metrics.jsonl / metrics.csv per round, resuming, summary, plots, final table."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from server.history import RunHistory, format_table
from server.registry import Registry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _round(acc: float, auc: float | None, losses: dict[str, float | None]) -> dict[str, Any]:
    return {
        "heldout": {"accuracy": acc, "auc": auc, "n": 10},
        "sites": {name: {"accuracy": acc, "num-examples": 5} for name in losses},
        "train": {name: {"loss": loss, "num-examples": 7} for name, loss in losses.items()},
    }


def _jsonl(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _csv(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_record_writes_one_json_line_per_round(tmp_path) -> None:
    hist = RunHistory(tmp_path)
    hist.record(0, _round(0.5, 0.6, {}), 0.12345)
    hist.record(1, _round(0.7, None, {"a": 0.4, "b": 0.2}), 2.0)
    rows = _jsonl(tmp_path)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["elapsed_s"] == 0.123
    assert rows[1]["heldout"] == {"accuracy": 0.7, "auc": None, "n": 10}
    assert rows[1]["train"]["b"] == {"loss": 0.2, "num-examples": 7}


def test_recording_a_round_again_replaces_it_and_rounds_stay_sorted(tmp_path) -> None:
    hist = RunHistory(tmp_path)
    hist.record(2, _round(0.2, 0.2, {}), 1.0)
    hist.record(0, _round(0.0, 0.0, {}), 1.0)
    hist.record(2, _round(0.9, 0.9, {}), 1.0)
    hist.record(1, _round(0.1, 0.1, {}), 1.0)
    rows = _jsonl(tmp_path)
    assert [(r["round"], r["heldout"]["accuracy"]) for r in rows] == [(0, 0.0), (1, 0.1), (2, 0.9)]


def test_csv_has_heldout_columns_and_the_mean_train_loss(tmp_path) -> None:
    hist = RunHistory(tmp_path)
    hist.record(0, _round(0.5, 0.6, {}), 0.0)
    hist.record(1, _round(0.75, 0.8, {"a": 0.3, "b": 0.6, "c": None}), 1.5)
    rows = _csv(tmp_path)
    assert rows[0] == {"round": "0", "elapsed_s": "0.0", "heldout_accuracy": "0.5",
                       "heldout_auc": "0.6", "heldout_n": "10", "train_loss_mean": ""}
    assert rows[1]["heldout_accuracy"] == "0.75"
    assert float(rows[1]["train_loss_mean"]) == pytest.approx((0.3 + 0.6) / 2)  # None skipped


def test_resumed_history_keeps_the_completed_rounds(tmp_path) -> None:
    first = RunHistory(tmp_path)
    first.record(0, _round(0.5, 0.6, {}), 0.0)
    first.record(1, _round(0.6, 0.7, {"a": 0.5}), 1.0)
    resumed = RunHistory(tmp_path)
    resumed.record(2, _round(0.7, 0.8, {"a": 0.4}), 2.0)
    assert [r["round"] for r in _jsonl(tmp_path)] == [0, 1, 2]
    assert [r["round"] for r in _csv(tmp_path)] == ["0", "1", "2"]


def test_progress_line_shows_na_for_an_undefined_metric(tmp_path) -> None:
    hist = RunHistory(tmp_path)
    hist.record(3, _round(0.8125, None, {}), 12.44)
    assert hist.progress_line(3, 10, "auc") == \
        "round 3/10  elapsed 12.4s  held-out auc n/a  accuracy 0.812"


def test_finish_writes_summary_and_two_png_plots(tmp_path, signing_key) -> None:
    hist = RunHistory(tmp_path / "run")
    hist.record(0, _round(0.5, 0.6, {}), 0.0)
    hist.record(1, _round(0.6, None, {"a": 0.5}), 1.0)
    registry = Registry(tmp_path / "run" / "registry", signing_key)
    summary = hist.finish(traffic={"a": {"backbone_sends": 1}}, adaptation={},
                          registry=registry, best_metric="auc")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    assert (summary["rounds"], summary["heldout"]["accuracy"]) == (1, 0.6)
    assert summary["traffic"] == {"a": {"backbone_sends": 1}}
    for name in ("heldout_metrics.png", "loss.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == PNG_SIGNATURE


def _summary(auc: float | None) -> dict[str, Any]:
    return {
        "sites": {"hungary": {"accuracy": 0.5, "auc": 0.75, "num-examples": 89.0},
                  "switzerland": {"accuracy": 0.9, "auc": auc, "num-examples": 16.0}},
        "heldout": {"accuracy": 0.6929, "auc": 0.7455, "n": 254},
        "adaptation": {},
    }


def _rows(table: str) -> dict[str, list[str]]:
    """Label -> cells; columns are separated by two or more spaces (labels may hold one)."""
    out = {}
    for line in table.splitlines()[2:]:
        cells = re.split(r"\s{2,}", line.strip())
        out[cells[0]] = cells[1:]
    return out


# cells after the label: n accuracy sensitivity specificity auc f1
def test_table_shows_undef_for_an_undefined_auc() -> None:
    rows = _rows(format_table(_summary(None)))
    assert rows["switzerland"][:2] == ["16", "0.900"]
    assert rows["switzerland"][4] == "undef"
    assert rows["hungary"][4] == "0.750"


def test_table_has_a_header_then_sites_then_their_mean_then_heldout() -> None:
    lines = format_table(_summary(0.5)).splitlines()
    assert lines[0].split() == ["site", "n", "accuracy", "sensitivity", "specificity", "auc", "f1"]
    assert list(_rows("\n".join(lines))) == ["hungary", "switzerland", "MEAN OF SITES", "HELD-OUT"]
    assert _rows("\n".join(lines))["HELD-OUT"][:2] == ["254", "0.693"]


def test_mean_of_sites_skips_undefined_values() -> None:
    rows = _rows(format_table(_summary(None)))
    # its n cell is empty, so cells start at accuracy: (0.5 + 0.9) / 2; auc: only hungary's
    # 0.75 is defined; f1: undefined everywhere
    assert rows["MEAN OF SITES"][0] == "0.700"
    assert rows["MEAN OF SITES"][3] == "0.750"
    assert rows["MEAN OF SITES"][4] == "undef"


def test_table_adds_adapted_rows() -> None:
    summary = {**_summary(0.5), "adaptation": {"hungary": {"after-accuracy": 0.25,
                                                            "num-examples": 89.0}}}
    assert _rows(format_table(summary))["hungary (adapted)"][:2] == ["89", "0.250"]
