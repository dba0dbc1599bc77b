"""End to end on Flower's simulation runtime: `medfed simulate` and `flwr run . local`.

Each test starts real processes (Ray, or a local SuperLink) in a new session and checks that
none of them outlives the command: every process of a run inherits a unique environment
marker, which is how leftovers are told apart from other Ray clusters on the machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from client.node import Node
from client.node import train as node_train
from common.bundle import load_bundle
from common.config_check import load_config
from common.pretrain import pretrain
from common.processes import free_port
from common.settings import NodeSettings, RunSettings
from common.signing import load_public_key
from server.federation import load_payload
from tests.conftest import HEART, PROJECT, SYNTHETIC
from tests.flower_helpers import descendants, leftovers, processes, snapshot, still_alive
from tests.limits import RUN_S, STOP_S

pytestmark = pytest.mark.slow

HEART_SITES = ("cleveland", "hungary", "switzerland", "va")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MEDFED = [sys.executable, "-m", "medfed.cli"]


@dataclass
class Finished:
    """A finished command: output, exit code, and what it left running."""

    code: int
    out: str
    err: str
    left: list[str]
    marker: str  # environment line every process of this run carries
    before: set[tuple[int, int]]  # processes alive before the run


def _marked(env: dict[str, str]) -> tuple[dict[str, str], str]:
    """A copy of `env` with a unique marker every descendant inherits."""
    marker = f"MEDFED_TEST_RUN={uuid.uuid4().hex}"
    name, value = marker.split("=")
    return {**env, name: value}, marker


def _kill_session(proc: subprocess.Popen[str]) -> None:
    """Last resort for a test that timed out: SIGKILL the session we started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run(cmd: list[str], env: dict[str, str], timeout: float, needles: tuple[str, ...] = ()
         ) -> Finished:
    """Run `cmd` in a new session; afterwards list the processes of the run still alive."""
    env, marker = _marked(env)
    before = snapshot()
    proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        pytest.fail(f"{' '.join(cmd[:4])} did not finish within {timeout} s")
    return Finished(proc.returncode, out, err, leftovers(before, marker, needles), marker,
                    before)


def _simulate(config: Path, bundle: Path, out: Path, env: dict[str, str], timeout: float,
              *extra: str) -> Finished:
    return _run([*MEDFED, "simulate", "--config", str(config), "--bundle", str(bundle),
                 "--out", str(out), *extra], env, timeout, needles=(str(out),))


def _verify(path: Path, pub_path: Path) -> dict:
    return load_bundle(path, load_public_key(pub_path), require_signature=True).manifest


# --- (a) heart, 2 rounds ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def heart_run(tmp_path_factory: pytest.TempPathFactory, heart_bundle: Path,
              cli_env: dict[str, str]) -> tuple[Path, Finished]:
    """One 2-round heart simulation shared by the checks below (about 30-60 s)."""
    out = tmp_path_factory.mktemp("heart_sim") / "run"
    return out, _simulate(HEART, heart_bundle, out, cli_env, RUN_S, "--rounds", "2")


def test_heart_simulation_exits_0_and_prints_the_table(heart_run) -> None:
    _, done = heart_run
    assert done.code == 0, done.err[-3000:]
    labels = {line.split("  ")[0] for line in done.out.splitlines()}
    assert {*HEART_SITES, "VALIDATION (server check)", "ALL SITES"} <= labels, done.out[-3000:]
    assert "test — not used for any choice" in done.out


def test_heart_simulation_leaves_no_process_behind(heart_run) -> None:
    assert heart_run[1].left == []


def test_backbone_went_to_every_node_exactly_once(heart_run) -> None:
    summary = json.loads((heart_run[0] / "summary.json").read_text())
    sends = {site: t["backbone_sends"] for site, t in summary["traffic"].items()}
    assert sends == dict.fromkeys(HEART_SITES, 1)


def _published(run: Path) -> dict[str, dict[str, str]]:
    return {v.name: json.loads((v / "manifest.json").read_text())["files"]
            for v in sorted((run / "registry").glob("v*"))}


def test_the_same_command_again_publishes_the_same_versions(tmp_path, heart_run, heart_bundle,
                                                            cli_env) -> None:
    """Flower's runtime draws new node ids each run and hands replies over as they arrive;
    the versions must not depend on either (tests/test_repeatable_run.py shows why)."""
    first, _ = heart_run
    again = _simulate(HEART, heart_bundle, tmp_path / "run", cli_env, RUN_S, "--rounds", "2")
    assert again.code == 0, again.err[-3000:]
    assert len(_published(first)) == 3
    assert _published(tmp_path / "run") == _published(first)
    best = json.loads((first / "registry" / "best.json").read_text())["version"]
    assert json.loads((tmp_path / "run" / "registry" / "best.json").read_text())["version"] == best


def test_every_simulated_hospital_trained_with_one_torch_thread_on_the_cpu(heart_run) -> None:
    """One core reserved per ClientApp (--cpus-per-client 1): one torch thread (Ray sets
    OMP_NUM_THREADS from the cores an actor holds), not one per core of the machine
    (oversubscription ran a CNN 10x slower); read from each training event."""
    trained = [json.loads(line) for site in HEART_SITES
               for line in (heart_run[0] / "nodes" / site / "events.jsonl").read_text()
               .splitlines() if '"event": "train"' in line]
    assert len(trained) == 2 * len(HEART_SITES)
    assert {(e["threads"], e["device"]) for e in trained} == {(1, "cpu")}


def test_registry_holds_three_signed_versions(heart_run, signing_pub_path) -> None:
    registry = heart_run[0] / "registry"
    versions = sorted(p.name for p in registry.iterdir() if p.is_dir())
    assert versions == ["v0000", "v0001", "v0002"]
    rounds = [_verify(registry / v, signing_pub_path)["round"] for v in versions]
    assert rounds == [0, 1, 2]


def test_latest_points_to_the_last_round_and_best_is_the_best_on_validation(heart_run) -> None:
    registry = heart_run[0] / "registry"
    assert json.loads((registry / "latest.json").read_text())["version"] == 2
    best = json.loads((registry / "best.json").read_text())
    assert (best["metric"], best["split"]) == ("auc", "validation")
    rows = [json.loads(line) for line in (heart_run[0] / "metrics.jsonl").read_text().splitlines()]
    aucs = [r["validation"]["auc"] for r in rows]
    # the highest validation AUC, ties to the later round
    assert best["version"] == max(range(len(aucs)), key=lambda v: (aucs[v], v))
    assert best["value"] == aucs[best["version"]]


def test_metrics_jsonl_has_every_round_with_validation_and_labelled_test_metrics(
        heart_run) -> None:
    lines = (heart_run[0] / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == [0, 1, 2]
    splits = json.loads((heart_run[0] / "splits.json").read_text())
    for r in rows:
        assert r["validation"]["n"] == sum(s["validation"] for s in splits.values())
        assert r["test"]["n"] == 104 + 89 + 16 + 45  # FLamby's test splits, evaluated at sites
        assert r["test"]["label"] == "test — not used for any choice"
        assert set(r["sites"]) == set(HEART_SITES)
        assert 0.0 <= r["validation"]["balanced_accuracy"] <= 1.0


def test_metrics_csv_and_plots_are_written(heart_run) -> None:
    run_dir = heart_run[0]
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,") and len(csv_lines) == 1 + 3
    for name in ("metrics.png", "loss.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_SIGNATURE


def test_every_site_saved_the_delivered_model_and_its_own_signed_model(
        heart_run, signing_pub_path) -> None:
    summary = json.loads((heart_run[0] / "summary.json").read_text())
    version = summary["final"]["version"]
    assert version == summary["best"]["version"]  # `best`, chosen on validation
    nodes = sorted((heart_run[0] / "nodes").iterdir())
    assert [n.name for n in nodes] == sorted(HEART_SITES)
    for node in nodes:
        assert _verify(node / "models" / f"v{version:04d}", signing_pub_path)["version"] == version
        assert (node / "models" / "site_stats.json").exists()
        site = _verify(node / "personalised", signing_pub_path)
        assert site["site"]["name"] == node.name
        assert "site_stats.json" in site["files"]
    assert set(summary["site_models"]) == set(HEART_SITES)


# --- (b) FedAvg by hand --------------------------------------------------------------------
def test_round_one_is_the_examples_weighted_mean_of_local_training(
    heart_run, heart_bundle, signing_key_path, tmp_path,
) -> None:
    """Recompute round 1 outside Flower: same node settings, same global head (v0000)."""
    run_dir, done = heart_run
    assert done.code == 0
    registry = run_dir / "registry"
    start = load_bundle(registry / "v0000").head
    payload = load_payload(heart_bundle)
    run = RunSettings(HEART, ("federation.rounds=2",), tmp_path / "run", heart_bundle,
                      signing_key_path)
    cfg = run.load_config()
    updates, counts = [], {}
    for i in range(4):
        node_cfg = {"partition-id": i, "num-partitions": 4, "workdir": str(tmp_path / f"n{i}")}
        node = Node(cfg, run, NodeSettings.from_node_config(node_cfg, run))
        node.backbones.store(payload.sha256, payload.file_bytes, payload.manifest_json,
                             payload.manifest_sig)
        arrays = {k: v.clone() for k, v in start.items()}
        tensors, result, site = node_train(node, arrays, payload.sha256, 1, 0.0)
        updates.append((result.num_examples, tensors))
        counts[site] = result.num_examples
    round1 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[1])
    assert counts == {s: round1["train"][s]["num-examples"] for s in HEART_SITES}
    total = sum(n for n, _ in updates)
    published = load_bundle(registry / "v0001").head
    for name in start:
        by_hand = sum(n * t[name].double().numpy() for n, t in updates) / total
        np.testing.assert_allclose(published[name].numpy(), by_hand, rtol=0, atol=1e-6)
    assert not torch.equal(published["head.weight"], start["head.weight"])


# --- (c) 50 synthetic hospitals --------------------------------------------------------------
def test_fifty_synthetic_hospitals_complete_and_leave_nothing(tmp_path, signing_key,
                                                              signing_pub_path, cli_env) -> None:
    bundle = tmp_path / "pretrain"
    pretrain(load_config(SYNTHETIC), bundle, signing_key)
    out = tmp_path / "run"
    # one message per node per round on Flower's runtime (the heart run above: two)
    done = _simulate(SYNTHETIC, bundle, out, cli_env, RUN_S, "--hospitals", "50",
                     "--set", "federation.data.synthetic_sites=50",
                     "--set", "federation.evaluate_with_train=true")
    assert done.code == 0, done.err[-3000:]
    assert done.left == []
    summary = json.loads((out / "summary.json").read_text())
    # fraction_train 1.0: all 50 took part, each got the backbone once over 3 rounds
    sends = [t["backbone_sends"] for t in summary["traffic"].values()]
    assert len(sends) == 50 and set(sends) == {1}
    assert summary["latest"]["version"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # every version scored at every site, the first three in the next round's train replies
    assert all(len(r["sites"]) == 50 for r in rows)
    assert all(s["validation"]["n"] > 0 for r in rows for s in r["sites"].values())
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert sum(e.get("type") == "evaluate" for e in audit) == 50  # the last version's only
    assert len(list((out / "nodes").iterdir())) == 50
    _verify(out / "registry" / "v0003", signing_pub_path)


# --- (c2) malicious hospitals on Flower's runtime ---------------------------------------------
def test_six_kinds_of_malicious_hospital_cannot_stop_or_take_over_a_run(
        tmp_path, signing_key, cli_env) -> None:
    bundle = tmp_path / "pretrain"
    pretrain(load_config(SYNTHETIC, ["pretrain.data.synthetic_sites=10"]), bundle, signing_key)
    out = tmp_path / "run"
    # 6 of 10 hospitals attack, one kind each: inflate-count, omit-count, huge-update,
    # nan-update, spoof-name, malformed (client/faults.py, `mixed`)
    done = _simulate(SYNTHETIC, bundle, out, cli_env, RUN_S, "--hospitals", "10",
                     "--rounds", "2", "--set", "federation.data.synthetic_sites=10",
                     "--set", "federation.strategy.fraction_evaluate=1.0",
                     "--set", "federation.faults.attack=mixed",
                     "--set", "federation.faults.attack_fraction=0.6",
                     "--set", "federation.faults.attack_value=3e38")
    log = done.out + done.err
    assert done.code == 0, log[-3000:]
    assert done.left == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    reasons = " ".join(" ".join(r.get("excluded", {}).values()) for r in rows)
    for reason in ("exceeds the bound", "NaN or infinite", "no 'num-examples'"):
        assert reason in reasons, reasons
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert any(e.get("excluded") == "reply has no metrics record" for e in audit)
    assert "capped the weight of" in log and "two hospitals call themselves" in log
    assert all(v is None or v == v for v in rows[-1]["validation"].values()
               if not isinstance(v, str))


# --- (d) Ctrl-C, SIGTERM ---------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_stops_the_simulation_and_everything_it_started(tmp_path, heart_bundle,
                                                                     cli_env, sig) -> None:
    # SIGINT is what Ctrl-C delivers to the foreground command; SIGTERM what `kill`, systemd
    # and `docker stop` send
    env, marker = _marked(cli_env)
    out = tmp_path / "run"
    before = snapshot()
    proc = subprocess.Popen(
        [*MEDFED, "simulate", "--config", str(HEART), "--bundle", str(heart_bundle),
         "--out", str(out), "--rounds", "200"],  # far more than can finish before the signal
        cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        # as a script's `medfed simulate &` starts it: SIGINT inherited ignored (the case that
        # once went unnoticed, the run going on to round 181)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines: list[str] = []
    in_round_1 = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "round 1/" in line:
                in_round_1.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        started = in_round_1.wait(timeout=RUN_S)
        tree = descendants(proc.pid)  # Ray's agents too, which lose the environment marker
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        reader.join(timeout=5)
        pytest.fail(f"medfed simulate did not exit within {STOP_S:g} s of {sig.name}; its "
                    "last lines:\n" + "".join(lines[-30:]))
    left = leftovers(before, marker, (str(out),))
    reader.join(timeout=5)
    assert started, "no 'round 1/' line before the timeout: " + "".join(lines[-30:])
    assert code == 130, "".join(lines[-30:])
    assert left == []
    assert len(tree) > 5, tree  # the worker, Ray's processes and its actors were seen
    assert still_alive(tree) == []
    assert "medfed: interrupted" in "".join(lines)


# --- (d2) the simulation runtime does not start -------------------------------------------------
def test_runtime_that_does_not_start_in_time_ends_with_one_sentence(tmp_path, heart_bundle,
                                                                    cli_env) -> None:
    # Ray takes seconds to start on any machine: half a second is always too short
    out = tmp_path / "run"
    done = _simulate(HEART, heart_bundle, out, cli_env, RUN_S, "--rounds", "2",
                     "--runtime-start-timeout", "0.5")
    assert done.code == 4, done.err[-3000:]
    errors = [line for line in done.err.splitlines() if "error" in line.lower()]
    assert errors == ["medfed: error: the simulation runtime did not start within 0.5 s: no "
                      "answer from Ray's processes (the machine may be too busy; raise "
                      "--runtime-start-timeout)"], done.err[-3000:]
    assert "Traceback" not in done.err + done.out
    assert done.left == []
    assert not (out / "summary.json").exists()


# --- (e) `flwr run` with Flower's local simulation SuperLink -----------------------------------
def _superlinks(flwr_home: Path) -> list[int]:
    """PIDs of the local SuperLink that `flwr` started for this FLWR_HOME."""
    return [p.pid for p in processes() if "flower-superlink" in p.cmdline
            and str(flwr_home) in p.cmdline and p.state not in ("Z", "X")]


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        live = {p.pid for p in processes() if p.state not in ("Z", "X")}
        alive = [pid for pid in pids if pid in live]
    return alive


@pytest.fixture
def flwr_home(tmp_path: Path) -> Iterator[Path]:
    """A private FLWR_HOME; the SuperLink `flwr run` leaves behind is killed at teardown."""
    home = tmp_path / "flwr"
    home.mkdir()
    yield home
    for pid in _superlinks(home):  # only if the test failed before stopping it
        os.kill(pid, signal.SIGKILL)


def test_flwr_run_local_simulation(tmp_path, flwr_home, heart_bundle, signing_key_path,
                                   cli_env) -> None:
    run_dir = tmp_path / "run"
    run_config = tmp_path / "run-config.toml"
    values = {"config-path": str(HEART), "overrides": json.dumps(["federation.rounds=1"]),
              "run-dir": str(run_dir), "bundle": str(heart_bundle),
              "keys": str(signing_key_path)}
    # JSON strings are valid TOML basic strings
    run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    env = {**cli_env, "FLWR_HOME": str(flwr_home),
           # ports of our own: never join (or stop) a local SuperLink someone else started
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    flwr = str(Path(sys.executable).parent / "flwr")
    done = _run([flwr, "run", str(PROJECT), "local", "--stream", "--run-config", str(run_config),
                 "--federation-config", "num-supernodes=4"], env, 300)
    assert done.code == 0, (done.out + done.err)[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["traffic"]) == set(HEART_SITES)
    assert summary["latest"]["version"] == 1

    links = _superlinks(flwr_home)
    assert len(links) == 1  # `flwr run` leaves its local SuperLink running, detached
    for pid in links:
        os.kill(pid, signal.SIGTERM)
    assert _wait_gone(links, STOP_S) == []
    # the SuperLink's own children (SuperExec, simulation, Ray) must go with it
    deadline = time.monotonic() + STOP_S
    while (left := leftovers(done.before, done.marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == []
