"""The benchmark plumbing on tiny sizes: result files, headline keys, report, emulation.

Not timing tests: the benchmarks themselves run with `make bench`.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import heart, report
from benchmarks import run as bench_run

HEADLINE_KEYS = {
    "heart_mean_centre_acc_global", "heart_mean_centre_acc_personalised",
    "heart_mean_centre_balanced_acc_personalised", "heart_min_site_balanced_acc_gain",
    "breast_auc_federated", "breast_auc_gain_pretrained_vs_scratch", "sim_cpu_ratio_100",
    "sim_cpu_ratio_1000", "sim_cpu_ratio_100_evaluate_with_train",
    "sim_cpu_ratio_1000_evaluate_with_train", "plain_flower_cpu_ratio_100",
    "plain_flower_cpu_ratio_1000", "sim_cpu_ratio_100_vs_plain_flower",
    "sim_cpu_ratio_1000_vs_plain_flower", "max_hospitals_simulated",
    "deploy_round_ratio_vs_flower",
    "make_test_seconds_idle", "make_test_seconds_loaded", "make_test_loaded_load_1min_mean",
    "max_hospitals_sampled_fraction", "breast_minutes_cpu", "gpu_check",
    "peak_rss_gb_max_hospitals", "upload_bytes_ratio", "backbone_sends_per_node",
    "feature_cache_speedup", "tls_latency_ratio", "defence_cost_share_of_round", "date",
    "machine", "command",
}


def _fake_module() -> types.ModuleType:
    module = types.ModuleType("benchmarks.fake")

    def run(quick: bool) -> dict[str, Any]:
        return {"value": 3, "headline": {"tls_latency_ratio": 1.5, "not_a_key": 7}}

    def markdown(res: dict[str, Any]) -> str:
        return f"fake value {res['value']}"

    module.run = run  # type: ignore[attr-defined]
    module.markdown = markdown  # type: ignore[attr-defined]
    return module


@pytest.fixture
def fake_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """benchmarks.run with one fake benchmark and results under tmp_path."""
    monkeypatch.setitem(sys.modules, "benchmarks.fake", _fake_module())
    monkeypatch.setattr(bench_run, "BENCHMARKS", ("fake",))
    monkeypatch.setattr(bench_run, "WORK", tmp_path / "work")
    monkeypatch.setattr(bench_run, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "TITLES", {"fake": "Fake benchmark"})
    monkeypatch.setattr(report, "NOTES", {"fake": "fake notes"})
    return tmp_path


def test_quick_run_writes_results_headline_and_report(fake_bench: Path) -> None:
    assert bench_run.main(["--quick"]) == 0
    out = fake_bench / "work" / "quick"
    result = json.loads((out / "fake.json").read_text())
    assert result["value"] == 3 and result["quick"] is True
    assert {"machine", "started", "wall_s"} <= set(result)
    head = json.loads((out / "headline.json").read_text())
    assert set(head) == HEADLINE_KEYS | {"total_wall_s"}
    assert head["tls_latency_ratio"] == 1.5
    assert head["heart_mean_centre_acc_global"] is None  # not measured: null
    assert head["command"] == "python -m benchmarks.run --quick"
    text = (out / "RESULTS.md").read_text()
    assert "fake value 3" in text and "QUICK run" in text
    assert not (fake_bench / "results").exists()  # quick never touches the committed files


def test_failing_benchmark_is_recorded_and_exit_code_is_one(
        fake_bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(quick: bool) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(sys.modules["benchmarks.fake"], "run", broken)
    assert bench_run.main(["--quick"]) == 1
    out = fake_bench / "work" / "quick"
    assert json.loads((out / "fake.json").read_text())["error"] == "RuntimeError: boom"
    assert "FAILED: `RuntimeError: boom`" in (out / "RESULTS.md").read_text()


def test_a_failing_run_keeps_the_stored_result_and_says_it_failed(
        fake_bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark broken by a later change must not erase its last good figures."""
    assert bench_run.main([]) == 0
    stored = json.loads((fake_bench / "results" / "fake.json").read_text())

    def broken(quick: bool) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(sys.modules["benchmarks.fake"], "run", broken)
    assert bench_run.main([]) == 1
    kept = json.loads((fake_bench / "results" / "fake.json").read_text())
    assert kept["value"] == 3 and kept["started"] == stored["started"]
    assert kept["last_failure"]["error"] == "RuntimeError: boom"
    text = (fake_bench / "RESULTS.md").read_text()
    assert "FAILED:** `RuntimeError: boom`" in text and "fake value 3" in text
    assert bench_run.main(["--render"]) == 0  # rendering alone reports, it does not fail
    monkeypatch.setattr(sys.modules["benchmarks.fake"], "run", _fake_module().run)
    assert bench_run.main([]) == 0
    assert "last_failure" not in json.loads((fake_bench / "results" / "fake.json").read_text())


def test_status_compares_with_the_target() -> None:
    assert report._status("tls_latency_ratio", 1.05) == "met (<= 1.1)"
    assert report._status("feature_cache_speedup", 9.0) == "MISSED (>= 10)"
    assert report._status("upload_bytes_ratio", None) == "not measured"
    check = {"value": 0.899, "seeds": [0, 1, 2, 3, 4], "cpu": "C", "kept_apart": True}
    assert report._status("breast_auc_federated", {"value": 0.901, "more_seeds": check}) == (
        "met (>= 0.9); seeds 0, 1, 2, 3, 4 on C, kept apart: 0.899, MISSED")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a busy machine: one torch thread (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_more_seeds_are_shown_apart_with_each_seeds_gain() -> None:
    """`--more-seeds`: a table of its own, marked as choosing nothing, with the gain of the
    first row over the second seed by seed."""
    from benchmarks import breast

    check = {"rows": {"a": {"validation_auc": [0.9, 0.8], "test_auc": [0.91, 0.85],
                            "versions": [7, 9]},
                      "b": {"validation_auc": [0.8, 0.8], "test_auc": [0.88, 0.86],
                            "versions": [5, 6]}},
             "seeds": [3, 4], "hospitals": 5, "started": "t", "cpu": "c", "wall_s": 9.0,
             "load_average_at_end": [1.5, 1.0, 1.0]}
    text = breast.seed_check_text(check)
    assert text.startswith("**More seeds, kept apart** (they choose nothing): seeds [3, 4]")
    assert "| a | 0.850 ± 0.071 | 0.880 ± 0.042 | 0.910, 0.850 | 7, 9 |" in text
    assert "per seed: +0.030, -0.010; mean 0.010 ± 0.028." in text
    res = {"rows": [], "hospitals": [], "seeds": [3, 4], "rounds": 40, "config": "c",
           "tuned_overrides": [], "headline_row": "a", "real_simulation": [],
           "more_seeds": check}
    assert text in breast.markdown(res)
    stored = {"headline": {"breast_auc_federated": {"row": "a", "value": 0.95},
                           "breast_auc_gain_pretrained_vs_scratch": {
                               "row": "a", "scratch_row": "b", "value": 0.05}}}
    out = breast.with_seed_check(stored, check)["headline"]
    assert out["breast_auc_federated"]["value"] == 0.95  # beside, not instead
    assert out["breast_auc_federated"]["more_seeds"]["value"] == pytest.approx(0.88)
    assert out["breast_auc_gain_pretrained_vs_scratch"]["more_seeds"]["value"] == \
        pytest.approx(0.01)
    assert "more_seeds" not in stored["headline"]["breast_auc_federated"]  # a copy


def test_a_new_headline_keeps_the_seed_check_only_while_its_rows_are_current() -> None:
    """After `--add-rows` or `--real-runs` choose the headline again, the seed check is shown
    beside it if its rows still have the same overrides and pretraining, else dropped."""
    from benchmarks import breast

    key, _, _, extra = next(r for r in breast.ROWS if r[0] == "cnn-all-160-warmup")
    check = {"rows": {key: {"test_auc": [0.9, 0.8], "pretrain": breast.pretrain_of(extra)}},
             "seeds": [0, 1], "cpu": "C"}
    out = {"rows": [{"key": key, "overrides": list(extra)}], "more_seeds": check,
           "headline": {"breast_auc_federated": {"row": key, "value": 0.9},
                        "breast_auc_gain_pretrained_vs_scratch": {
                            "row": key, "scratch_row": "other", "value": 0.0}}}
    kept = breast._keep_seed_check(out)
    assert kept["headline"]["breast_auc_federated"]["more_seeds"]["value"] == \
        pytest.approx(0.85)
    stale = {**check, "rows": {key: {**check["rows"][key],
                                     "pretrain": {"tag": "x", "recipe": "y"}}}}
    dropped = breast._keep_seed_check({**out, "more_seeds": stale})
    assert "more_seeds" not in dropped
    assert "more_seeds" not in dropped["headline"]["breast_auc_federated"]


@pytest.mark.usefixtures("one_thread")
def test_heart_emulation_tiny_run_reports_every_centre(tmp_path: Path) -> None:
    tiny = ("pretrain.optim.epochs=1", "federation.rounds=1", "federation.local.steps=2",
            "federation.adaptation.steps=2", "federation.adaptation.eval_every=1")
    res = heart.one_run(tiny, "fed", 0, tmp_path)
    assert set(res["sites"]) == set(heart.SITES) == set(res["site_models"])
    assert res["version"] in (0, 1) and len(res["validation_curve"]) == 2
    # Switzerland's train split is all positive: a bounded intercept shift, never fine-tuning
    swiss = res["site_models"]["switzerland"]
    assert swiss["method"] == "prior-shift"
    assert 0.0 <= swiss["site_model"]["test"]["accuracy"] <= 1.0
    agg = heart.aggregate([res, res])
    assert agg["mean_centre_acc"]["std"] == 0.0 and agg["mean_centre_acc"]["n"] == 2
    assert agg["site_models"]["sites"]["switzerland"]["kept_adapted"] in (0, 2)


def test_every_kind_of_heart_row_runs(tmp_path: Path) -> None:
    """One tiny seed of each kind of row the heart table has (the from-scratch rows broke
    once without a test noticing: the benchmark failed only when run in full)."""
    tiny = ("pretrain.optim.epochs=1", "federation.rounds=1", "federation.local.steps=2",
            "federation.adaptation.enabled=false")
    kinds = {kind: extra for _, _, kind, extra in heart.ROWS}
    assert {"majority", "fed", "fed+scratch"} <= set(kinds)
    for kind, extra in kinds.items():
        res = heart.one_run((*tiny, *extra), kind, 0, tmp_path)
        assert set(res["sites"]) == set(heart.SITES), kind


def test_render_rewrites_the_report_without_running(
        fake_bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench_run.main(["--quick"]) == 0
    out = fake_bench / "work" / "quick"
    (out / "RESULTS.md").unlink()

    def must_not_run(quick: bool) -> dict[str, Any]:
        raise AssertionError("--render ran a benchmark")

    measured = json.loads((out / "fake.json").read_text())
    monkeypatch.setattr(sys.modules["benchmarks.fake"], "run", must_not_run)
    monkeypatch.setattr(bench_run, "machine", lambda: {"load_average_1_5_15": [99.0, 0, 0]})
    assert bench_run.main(["--quick", "--render"]) == 0
    assert "fake value 3" in (out / "RESULTS.md").read_text()
    head = json.loads((out / "headline.json").read_text())
    assert head["command"] == "python -m benchmarks.run --quick"  # who made the numbers
    # when, where and under what load the numbers were measured, not the render's
    assert (head["date"], head["machine"]) == (measured["started"], measured["machine"])


def test_deployment_phases_are_read_from_the_audit_in_order(tmp_path: Path) -> None:
    from benchmarks.deploy_vs_flower import message_phases, phase_summary

    lines = [("query.backbone", None, 100.0), ("query.backbone", None, 100.2),  # one batch
             ("evaluate", 0, 106.2), ("evaluate", 0, 106.3),
             ("train", 1, 112.5), ("evaluate", 1, 118.6), ("train", 2, 125.0),
             ("evaluate", 2, 131.1), ("query.save_model", None, 137.2)]
    audit = tmp_path / "audit.jsonl"
    audit.write_text("".join(json.dumps({"type": k, "round": r, "time": t, "node": 1}) + "\n"
                             for k, r, t in lines))
    phases = message_phases(audit)
    assert [(p["kind"], p["round"]) for p in phases] == [
        ("query.backbone", None), ("evaluate", 0), ("train", 1), ("evaluate", 1), ("train", 2),
        ("evaluate", 2), ("query.save_model", None)]
    assert phases[0]["seconds"] is None and phases[1]["seconds"] == 6.1  # from 100.2
    assert phase_summary(phases) == {"evaluate": 6.1, "train": 6.3, "query.save_model": 6.1}


def test_gpu_check_is_not_run_without_a_recorded_result_and_shown_with_one(
        fake_bench: Path) -> None:
    assert bench_run.main([]) == 0
    head = json.loads((fake_bench / "results" / "headline.json").read_text())
    assert head["gpu_check"] == "not run: no device lent"
    text = (fake_bench / "RESULTS.md").read_text()
    assert "## 9. GPU check" in text and "Not run: no device lent" in text
    recorded = {"device": "NVIDIA H200", "train_images_per_s_cuda": 52000.0,
                "validation_auc": 0.81, "train_event_devices": ["cuda:0"]}
    (fake_bench / "results" / "gpu_check.json").write_text(json.dumps(recorded))
    assert bench_run.main(["--render"]) == 0
    head = json.loads((fake_bench / "results" / "headline.json").read_text())
    assert head["gpu_check"]["device"] == "NVIDIA H200"
    assert head["gpu_check"]["train_event_devices"] == ["cuda:0"]
    text = (fake_bench / "RESULTS.md").read_text()
    assert "| train_images_per_s_cuda | 52000.000 |" in text and "cuda:0" in text


def test_breast_gain_compares_the_chosen_pretrained_row_with_the_same_setting_from_scratch(
) -> None:
    from benchmarks import breast

    def row(key: str, kind: str, family: str, val: float, test: float,
            rounds: int = 40) -> dict:
        return {"key": key, "kind": kind,
                "overrides": [f"model.family={family}", f"federation.rounds={rounds}"],
                "5": {"validation_auc": {"mean": val}, "test_auc": {"mean": test}}}

    rows = [row("all", "fed", "resnet", 0.86, 0.85), row("cnn-all", "fed", "cnn", 0.87, 0.88),
            row("scratch", "fed+scratch", "resnet", 0.84, 0.80),
            row("cnn-scratch", "fed+scratch", "cnn", 0.83, 0.84),
            row("central", "central", "resnet", 0.95, 0.95)]
    def chosen(rows: list[dict]) -> tuple[str, str, str, float]:
        """(headline row, the gain's pretrained row, its scratch row, the gain)."""
        out = breast._finish(rows, quick=True, real=None)
        gain = out["headline"]["breast_auc_gain_pretrained_vs_scratch"]
        return out["headline_row"], gain["row"], gain["scratch_row"], gain["value"]

    # the highest validation AUC among federated rows; the gain against the same CNN from
    # scratch (0.04), not against the residual CNN's (0.08)
    assert chosen(rows) == ("cnn-all", "cnn-all", "cnn-scratch", pytest.approx(0.04))
    # at equal rounds too: a longer pretrained row is compared with as long a scratch row
    rows += [row("cnn-all-80", "fed", "cnn", 0.89, 0.90, rounds=80),
             row("cnn-scratch-80", "fed+scratch", "cnn", 0.85, 0.87, rounds=80)]
    assert chosen(rows) == ("cnn-all-80", "cnn-all-80", "cnn-scratch-80", pytest.approx(0.03))
    # of several scratch recipes of that setting, the one with the higher validation AUC
    rows += [row("cnn-scratch-80-b", "fed+scratch", "cnn", 0.86, 0.86, rounds=80),
             row("cnn-scratch-80-c", "fed+scratch", "cnn", 0.84, 0.70, rounds=80)]
    assert chosen(rows) == ("cnn-all-80", "cnn-all-80", "cnn-scratch-80-b", pytest.approx(0.04))
    # a scratch row leading on validation stays a comparator: medfed runs pretrained settings
    rows.append(row("cnn-scratch-80-d", "fed+scratch", "cnn", 0.95, 0.60, rounds=80))
    assert chosen(rows) == ("cnn-all-80", "cnn-all-80", "cnn-scratch-80-d", pytest.approx(0.30))


def test_adding_a_row_runs_only_the_hospital_counts_not_stored_for_its_settings() -> None:
    """`python -m benchmarks.breast --add-rows`: a (row, hospitals) summary stored for the same
    overrides and seeds by the same emulation is kept; anything else about it changed, and it
    runs again; `--hospitals 5` runs only that count and keeps whatever the others hold."""
    from benchmarks import breast, emulate

    key, label, kind, extra = next(r for r in breast.ROWS if r[0] == "cnn-all-160")
    row = ((key, label, kind, extra),)
    seeds = list(breast.SEEDS_BY_HOSPITALS[5])
    now = {"seeds": seeds, "aggregation": emulate.AGGREGATION,
           "pretrain": breast.pretrain_of(extra)}
    stored = {key: {"key": key, "kind": kind, "overrides": list(extra), "5": now}}
    runs = breast._jobs(row, quick=False, stored=stored)
    assert {(k, s) for _, _, k, s, _ in runs} == {(20, s) for s in breast.SEEDS_BY_HOSPITALS[20]}
    other_recipe = breast.pretrain_of((*extra, "pretrain.objective=simclr"))
    assert other_recipe["recipe"] != now["pretrain"]["recipe"]
    for changed in ({"overrides": [*extra, "federation.local.lr=0.5"]},
                    {"5": {**now, "seeds": seeds[:1]}},
                    # configs/breast.yaml's pretraining changed since the row ran
                    {"5": {**now, "pretrain": other_recipe}},
                    {"5": {"seeds": seeds}}):  # computed before the emulation was exact
        runs = breast._jobs(row, quick=False, stored={key: {**stored[key], **changed}})
        assert sorted({k for _, _, k, _, _ in runs}) == [5, 20]
    stale = {key: {**stored[key], "5": {"seeds": seeds}, "20": {"seeds": seeds}}}
    runs = breast._jobs(row, quick=False, stored=stale, only=(5,))
    assert {(k, s) for _, _, k, s, _ in runs} == {(5, s) for s in seeds}
    assert not breast.current(stale[key], 20)  # kept, and marked stale in RESULTS.md


def test_breast_tables_mark_the_rows_the_exact_emulation_did_not_run() -> None:
    """A stored row from the float64 emulation is marked, and the note says why; the
    centralised row aggregates nothing and is never marked."""
    from benchmarks import breast, emulate

    def part(val: float, tag: bool) -> dict[str, Any]:
        one = {"mean": val, "std": 0.0, "n": 3}
        return {"validation_auc": one, "test_auc": one, "test_auc_lo": one, "test_auc_hi": one,
                "test_balanced_acc": one, "test_sensitivity": one, "test_specificity": one,
                "seeds": [0, 1, 2], "versions": [9, 9, 9],
                **({"aggregation": emulate.AGGREGATION} if tag else {})}

    rows = [{"key": "new", "label": "Re-run row", "kind": "fed", "5": part(0.9, True)},
            {"key": "old", "label": "Stored row", "kind": "fed", "5": part(0.8, False)},
            {"key": "central", "label": "Pooled row", "kind": "central", "5": part(0.7, False)}]
    res = {"rows": rows, "hospitals": [5], "seeds": [0, 1, 2], "rounds": 40, "config": "c",
           "tuned_overrides": [], "headline_row": "new", "real_simulation": []}
    text = breast.markdown(res)
    assert "| Stored row ‡ |" in text and "| Re-run row |" in text and "| Pooled row |" in text
    assert "‡ Not run again since the emulation became exact" in text
    rows[1]["5"]["aggregation"] = emulate.AGGREGATION
    assert "‡" not in breast.markdown(res)


@pytest.mark.usefixtures("one_thread")
def test_the_plain_flower_side_trains_every_hospital_every_round(tmp_path: Path) -> None:
    """benchmarks/plain_sim.py (the overhead benchmark's plain Flower app), its ServerApp and
    ClientApp on an in-process grid: a line per round, each after every hospital's update."""
    from flwr.app import Context, RecordDict

    from benchmarks import emulate, overhead, plain_sim
    from common.config_check import load_config
    from tests.flower_helpers import task_identity
    from tests.inprocess_grid import InProcessGrid

    hospitals, rounds = 3, 2
    ovr = [*overhead.overrides(hospitals, rounds), "pretrain.optim.epochs=1",
           "federation.local.steps=2"]
    cfg = load_config(overhead.CONFIG, ovr)
    bundle = emulate.bundle_for(cfg, tmp_path / "bundles", tmp_path / "signing.key")
    progress = tmp_path / "rounds.jsonl"
    request = json.dumps({"config": str(overhead.CONFIG), "overrides": ovr,
                          "bundle": str(bundle), "home": str(tmp_path),
                          "progress": str(progress)}, sort_keys=True)
    grid = InProcessGrid(plain_sim.make_client(request), hospitals)
    with task_identity():
        plain_sim.make_server(request)(grid, Context(run_id=7, node_id=0, node_config={},
                                                     state=RecordDict(), run_config={}))
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1, 2]
    assert [line["replies"] for line in lines[1:]] == [hospitals] * rounds
    assert all(not r.has_error() for r in grid.received) and len(grid.received) == 6


def test_pretraining_sweep_writes_signed_bundles_with_pneumonias_two_classes(
        tmp_path: Path) -> None:
    """The sixth BreastMNIST sweep's backbones must load as the product loads a bundle, with
    PneumoniaMNIST's head (a joint head over RetinaMNIST's grades too is cut back to it); a
    cached one is reused only when signed with the key the runs check it with."""
    from benchmarks import emulate, pretrain_sources
    from common.bundle import load_bundle
    from common.contrastive import to_channels
    from common.signing import load_or_create_signing_key

    keys, other = tmp_path / "signing.key", tmp_path / "other" / "signing.key"
    assert not emulate.signed_with(tmp_path / "bundle", keys)  # none yet
    pretrain_sources.pretrain_variant("simclr-2-retina", tmp_path / "bundle", keys)
    key, _ = load_or_create_signing_key(keys)
    bundle = load_bundle(tmp_path / "bundle", key.public_key(), require_signature=True)
    assert bundle.head["head.weight"].shape[0] == 2
    assert bundle.manifest["source"] == "benchmarks.pretrain_sources:simclr-2-retina"
    assert not emulate.signed_with(tmp_path / "bundle", other)  # no such key yet
    load_or_create_signing_key(other)
    assert not emulate.signed_with(tmp_path / "bundle", other)  # another key than the signer
    assert emulate.signed_with(tmp_path / "bundle", keys)
    grey = torch.rand(4, 1, 28, 28).numpy()
    # grey equal channels stay as they were (the luminance weights sum to 1)
    assert to_channels(grey.repeat(3, axis=1), 1, "test") == pytest.approx(grey, abs=1e-6)


def test_a_headline_rule_narrowed_after_a_look_at_test_says_what_the_earlier_rule_gives(
        ) -> None:
    """Benchmark 2's headline is chosen among the pretrained rows since a scratch row led on
    validation: every rendering (stored results too) must show the split of the value and
    what the earlier rule (every federated row) picks, when that differs."""
    from benchmarks import breast

    def row(key: str, kind: str, val: float, test: float) -> dict[str, object]:
        return {"key": key, "kind": kind, "5": {"validation_auc": {"mean": val},
                                                "test_auc": {"mean": test}}}

    res = {"rows": [row("cnn-all", "fed", 0.91, 0.90), row("cnn-scratch", "fed+scratch",
                                                              0.92, 0.89)],
           "headline": {"breast_auc_federated": {"value": 0.90, "row": "cnn-all",
                                                 "selected_on": "validation"}}}
    figure = breast.headline_notes(res)["breast_auc_federated"]
    assert figure["split"] == "test"
    assert figure["rule_note"].endswith("the headline is cnn-scratch (validation AUC 0.920), "
                                        "test AUC 0.890")
    res["rows"][1]["5"]["validation_auc"]["mean"] = 0.90  # the pretrained row leads anyway
    assert "rule_note" not in breast.headline_notes(res)["breast_auc_federated"]
    assert "rule_note" not in res["headline"]["breast_auc_federated"]  # the input untouched
