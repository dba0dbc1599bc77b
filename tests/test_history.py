"""Run history: metrics.jsonl / metrics.csv per round, resuming, summary, plots, final table."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from common.data.splits import TEST_LABEL
from common.registry import Registry
from server.history import RunHistory, format_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _round(acc: float, auc: float | None, losses: dict[str, float | None]) -> dict[str, Any]:
    return {
        "validation": {"accuracy": acc, "auc": auc, "n": 10, "split": "validation"},
        "test": {"accuracy": acc - 0.1, "auc": auc, "n": 20, "label": TEST_LABEL},
        "sites": {name: {"validation": {"accuracy": acc, "n": 5},
                         "test": {"accuracy": acc - 0.1, "n": 10}} for name in losses},
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
    assert rows[1]["validation"] == {"accuracy": 0.7, "auc": None, "n": 10, "split": "validation"}
    assert rows[1]["test"]["label"] == "test — not used for any choice"
    assert rows[1]["train"]["b"] == {"loss": 0.2, "num-examples": 7}


def test_recording_a_round_again_replaces_it_and_rounds_stay_sorted(tmp_path) -> None:
    hist = RunHistory(tmp_path)
    hist.record(2, _round(0.2, 0.2, {}), 1.0)
    hist.record(0, _round(0.0, 0.0, {}), 1.0)
    hist.record(2, _round(0.9, 0.9, {}), 1.0)
    hist.record(1, _round(0.1, 0.1, {}), 1.0)
    rows = _jsonl(tmp_path)
    assert [(r["round"], r["validation"]["accuracy"]) for r in rows] == \
        [(0, 0.0), (1, 0.1), (2, 0.9)]


def test_a_long_run_encodes_each_round_once(tmp_path, monkeypatch) -> None:
    # the metrics files are rewritten after every round; encoding every earlier round (every
    # site's metrics) again each time made a 1000-round run's bookkeeping grow with rounds^2
    import server.history as history

    encoded: list[int] = []
    real = history.json.dumps

    def counting(obj: Any, **kw: Any) -> str:
        if isinstance(obj, dict) and "round" in obj:
            encoded.append(obj["round"])
        return real(obj, **kw)

    monkeypatch.setattr(history.json, "dumps", counting)
    hist = RunHistory(tmp_path)
    sites = {f"site-{i}": 0.3 for i in range(20)}
    for rnd in range(40):
        hist.record(rnd, _round(0.5, 0.6, sites), float(rnd))
    assert sorted(encoded) == list(range(40))
    monkeypatch.undo()
    assert [r["round"] for r in _jsonl(tmp_path)] == list(range(40))
    # a resumed history (a new process) continues the same file
    resumed = RunHistory(tmp_path)
    resumed.record(40, _round(0.9, 0.9, sites), 41.0)
    rows = _jsonl(tmp_path)
    assert [r["round"] for r in rows] == list(range(41)) and rows[40]["validation"]["auc"] == 0.9
    assert rows[3] == json.loads(json.dumps({"round": 3, "elapsed_s": 3.0,
                                             **_round(0.5, 0.6, sites)}))


def test_split_sizes_are_written_only_when_they_change(tmp_path) -> None:
    hist = RunHistory(tmp_path)
    hist.write_splits({"a": {"train": 3, "validation": 1, "test": 1}})
    (tmp_path / "splits.json").touch()
    touched = (tmp_path / "splits.json").stat().st_mtime_ns
    hist.write_splits({"a": {"train": 3, "validation": 1, "test": 1}})
    assert (tmp_path / "splits.json").stat().st_mtime_ns == touched
    hist.write_splits({"a": {"train": 3, "validation": 1, "test": 1},
                       "b": {"train": 4, "validation": 2, "test": 2}})
    assert json.loads((tmp_path / "splits.json").read_text())["b"]["train"] == 4


def test_csv_has_validation_and_test_columns_and_the_mean_train_loss(tmp_path) -> None:
    hist = RunHistory(tmp_path)
    hist.record(0, _round(0.5, 0.6, {}), 0.0)
    hist.record(1, _round(0.75, 0.8, {"a": 0.3, "b": 0.6, "c": None}), 1.5)
    rows = _csv(tmp_path)
    assert rows[0] == {"round": "0", "elapsed_s": "0.0", "validation_accuracy": "0.5",
                       "validation_auc": "0.6", "validation_n": "10", "test_accuracy": "0.4",
                       "test_auc": "0.6", "test_n": "20", "train_loss_mean": ""}
    assert rows[1]["validation_accuracy"] == "0.75"
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
    assert hist.progress_line(3, 10, "auc") == (
        "round 3/10  elapsed 12.4s  validation auc n/a  balanced accuracy n/a  "
        "| test auc n/a (test — not used for any choice)")


SITE_MODEL = {
    "kept": "adapted", "method": "fine-tune", "reason": "best on validation after 5 of 25 steps",
    "steps": 5, "operating_point": {"threshold": 0.4, "temperature": 1.2},
    "site_model": {"validation": {"balanced_accuracy": 0.8},
                   "test": {"balanced_accuracy": 0.75, "auc": 0.81, "auc_lo": 0.7,
                            "auc_hi": 0.9, "sensitivity": 0.7, "specificity": 0.8}},
    "global": {"validation": {"balanced_accuracy": 0.7},
               "test": {"balanced_accuracy": 0.65, "auc": None}},
}


def test_finish_reports_the_delivered_version_and_writes_two_png_plots(tmp_path,
                                                                        signing_key) -> None:
    hist = RunHistory(tmp_path / "run")
    hist.record(0, _round(0.5, 0.6, {}), 0.0)
    hist.record(1, _round(0.6, None, {"a": 0.5}), 1.0)
    registry = Registry(tmp_path / "run" / "registry", signing_key)
    summary = hist.finish(traffic={"a": {"backbone_sends": 1}}, site_models={"a": SITE_MODEL},
                          registry=registry, best_metric="auc",
                          final={"version": 0, "chosen_by": "best"})
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary
    # the figures of the version hospitals got (0), not of the last round (1)
    assert (summary["rounds"], summary["validation"]["accuracy"]) == (1, 0.5)
    assert summary["site_models"]["a"]["kept"] == "adapted"
    assert summary["traffic"] == {"a": {"backbone_sends": 1}}
    for name in ("metrics.png", "loss.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == PNG_SIGNATURE


def test_split_sizes_are_recorded(tmp_path) -> None:
    RunHistory(tmp_path).write_splits({"a": {"train": 8, "validation": 2, "test": 5}})
    assert json.loads((tmp_path / "splits.json").read_text())["a"]["validation"] == 2


def _summary(auc: float | None) -> dict[str, Any]:
    return {
        "sites": {"hungary": {"validation": {"accuracy": 0.5, "auc": 0.75, "n": 34},
                              "test": {"accuracy": 0.6, "auc": 0.7, "n": 89}},
                  "switzerland": {"validation": {"accuracy": 0.9, "auc": auc, "n": 6},
                                  "test": {"accuracy": 0.9, "auc": auc, "n": 16}}},
        "validation": {"accuracy": 0.6929, "auc": 0.7455, "n": 40},
        "test": {"accuracy": 0.65, "auc": 0.7, "n": 105},
        "site_models": {},
    }


def _rows(table: str) -> list[list[str]]:
    """Rows of the first table; columns are separated by two or more spaces."""
    out = []
    for line in table.split("\n\n")[0].splitlines()[2:]:
        out.append(re.split(r"\s{2,}", line.strip()))
    return out


# cells: label split n balanced_accuracy auc sensitivity specificity accuracy
def test_table_labels_test_rows_and_shows_undef_for_an_undefined_auc() -> None:
    table = format_table(_summary(None))
    rows = _rows(table)
    swiss = [r for r in rows if r[0] == "switzerland"]
    assert [r[1] for r in swiss] == ["validation", "test*"]
    assert swiss[1][2] == "16" and swiss[1][4] == "undef"
    assert table.rstrip().endswith("test — not used for any choice: every choice above was "
                                   "made on validation splits.")


def test_table_ends_with_the_server_check_and_all_sites() -> None:
    rows = _rows(format_table(_summary(0.5)))
    assert [r[0] for r in rows][-2:] == ["VALIDATION (server check)", "ALL SITES"]
    assert rows[-1][1:3] == ["test*", "105"]


def test_table_shows_each_site_model_and_why() -> None:
    summary = {**_summary(0.5), "site_models": {"hungary": SITE_MODEL}}
    table = format_table(summary)
    assert "0.810 [0.700, 0.900]" in table
    assert ("hungary: kept the adapted model (fine-tune): best on validation after 5 of 25 "
            "steps") in table


def test_a_resume_drops_the_rows_of_rounds_that_were_never_committed(tmp_path) -> None:
    """Killed after round 2 was recorded and before its commit: its version is dropped, so
    its row must go too (metrics.jsonl, the CSV and the plots showed it)."""
    hist = RunHistory(tmp_path)
    for r in range(3):
        hist.record(r, _round(0.6 + r / 10, 0.7, {"a": 0.5}), float(r))
    resumed = RunHistory(tmp_path, committed=1)
    assert [r["round"] for r in resumed.rounds] == [0, 1]
    resumed.record(2, _round(0.5, 0.7, {"a": 0.5}), 9.0)
    assert [r["accuracy"] for r in (x["validation"] for x in _jsonl(tmp_path))] == \
        pytest.approx([0.6, 0.7, 0.5])
