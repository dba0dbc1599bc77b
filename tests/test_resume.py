"""Crash resume with real processes: `kill -9` mid-run, then `--resume` continues from the next
round; no completed round is lost or repeated and the registry has no half-written version.
The deployed server runs from a non-editable install of medfed, as the Docker image has it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.bundle import load_bundle
from common.processes import free_port
from common.signing import load_public_key
from server.checkpoint import load_checkpoint
from tests.conftest import HEART
from tests.installed import fresh_env
from tests.limits import COMMAND_S, GONE_WITHIN_S, RUN_S, STOP_S
from tests.test_deploy_e2e import _gone_within, _pids_in, _stop, _wait_for

pytestmark = pytest.mark.slow

ROUNDS_DEPLOYED = 2  # killed once v0001 is published, resumed for the last round
ROUNDS = 5
# two hospitals: every message starts a ClientApp process per hospital (Flower's design, about
# 4 s of CPU each), and a third checks nothing more about resuming
HOSPITALS = {"hospital-a": "cleveland", "hospital-b": "hungary"}


def _alive_in_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _committed(run_dir: Path) -> int:
    """The round the run's checkpoint commits (0: none yet, or being replaced right now)."""
    try:
        checkpoint = load_checkpoint(run_dir)
    except (OSError, ValueError):  # caught between the atomic replace's two renames
        return 0
    return checkpoint.round if checkpoint is not None else 0


def _check_run(run_dir: Path, rounds: int, pub_path: Path) -> None:
    registry = run_dir / "registry"
    names = sorted(p.name for p in registry.iterdir())
    assert [n for n in names if n.startswith(".")] == []  # no half-written version left
    versions = sorted(int(n[1:]) for n in names if n.startswith("v"))
    assert versions == list(range(rounds + 1))
    pub = load_public_key(pub_path)
    for v in versions:
        load_bundle(registry / f"v{v:04d}", pub, require_signature=True)
    recorded = [json.loads(line)["round"] for line in
                (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recorded == list(range(rounds + 1))  # each round once, none lost
    assert json.loads((registry / "latest.json").read_text())["version"] == rounds


def test_simulate_resumes_after_kill_9(tmp_path: Path, heart_bundle: Path, medfed_home: Path
                                       ) -> None:
    run_dir = tmp_path / "sim"
    env = {**os.environ, "MEDFED_HOME": str(medfed_home)}
    # enough local work per round that the kill lands mid-run
    args = [sys.executable, "-m", "medfed.cli", "simulate", "--config",
            str(HEART), "--bundle", str(heart_bundle), "--out",
            str(run_dir), "--rounds", str(ROUNDS), "--set", "federation.local.steps=2500",
            "--set", "federation.adaptation.enabled=false"]
    log = tmp_path / "first.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        assert _wait_for(log, f"round 2/{ROUNDS}", RUN_S, proc), log.read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_S)
        deadline = time.monotonic() + STOP_S
        while _alive_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive_in_group(proc.pid), "simulation processes outlived `kill -9`"
    finally:
        _stop(proc)
    committed = _committed(run_dir)
    assert 2 <= committed < ROUNDS

    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env,
                             timeout=RUN_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"round {committed + 1}/{ROUNDS}" in resumed.stdout + resumed.stderr
    assert f"round {committed}/{ROUNDS}" not in resumed.stdout + resumed.stderr
    _check_run(run_dir, ROUNDS, medfed_home / "signing.pub")


def _installed_federation(venv: Path, work: Path, env: dict[str, str]) -> None:
    """Certificates, two registered hospitals, a signed bundle and the hospitals' CSVs, each
    made by the installed `medfed` as an operator would."""
    def run(*args: str) -> None:
        result = subprocess.run([str(venv / "bin" / "medfed"), *args], cwd=work, env=env,
                                capture_output=True, text=True, timeout=COMMAND_S)
        assert result.returncode == 0, (args, result.stderr[-2000:])

    run("certs", "init", "--out", "certs", "--server-name", "localhost")
    entries = []
    for name in HOSPITALS:
        run("certs", "hospital", "--name", name, "--out", "certs/hospitals", "--ca", "certs")
        entries.append(f"- name: {name}\n  public_key: certs/hospitals/{name}/node_key.pub\n")
    (work / "hospitals.yaml").write_text("".join(entries), encoding="utf-8")
    run("pretrain", "--config", str(HEART), "--set", "pretrain.optim.epochs=2", "--out",
        "pretrain", "--keys", "certs/signing.key")
    run("export-heart", "--out", "data")


def _healthcheck(medfed: str, health: int, work: Path, env: dict[str, str]
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([medfed, "healthcheck", "--port", str(health), "--run-dir",
                           "server-run"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=COMMAND_S)


def test_server_from_a_non_editable_install_resumes_after_kill_9(tmp_path: Path) -> None:
    """A deployment as the Docker image runs it (medfed from its wheel, started outside the
    checkout; TLS, node auth, health port), killed with SIGKILL mid-run and resumed.

    One deployment checks both: each costs about 100 s of CPU in Flower's processes (a fresh
    ClientApp process per message), and nothing about resuming depends on how medfed was
    installed.
    """
    venv = fresh_env(tmp_path)
    medfed = str(venv / "bin" / "medfed")
    work = tmp_path / "work"  # outside the checkout: nothing resolves against it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"MEDFED_HOME": str(work / "home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1"})
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import common, server, client; print(common.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed copy, not the checkout
    _installed_federation(venv, work, env)

    run_dir = work / "server-run"
    port, registry_port, health = free_port(), free_port(), free_port()
    cmd = [medfed, "server", "--config", str(HEART), "--set",
           f"federation.rounds={ROUNDS_DEPLOYED}",
           "--set", f"federation.strategy.min_nodes={len(HOSPITALS)}",
           "--set", "federation.adaptation.enabled=false",
           # one message per hospital per round: a version is committed once the next
           # round's train replies bring its scores (simulate's resume test covers the default)
           "--set", "federation.evaluate_with_train=true", "--bundle", "pretrain",
           "--certs", "certs", "--hospitals", "hospitals.yaml", "--port", str(port),
           "--registry-port", str(registry_port), "--health-port", str(health),
           "--run-dir", "server-run", "--exit-after-run"]
    log = work / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True)
    clients: list[subprocess.Popen[bytes]] = []
    second = None
    try:
        assert _wait_for(log, "model registry on", COMMAND_S, server), log.read_text()
        deadline = time.monotonic() + COMMAND_S
        while (check := _healthcheck(medfed, health, work, env)).returncode:
            assert time.monotonic() < deadline, check.stderr
            time.sleep(1)
        assert check.stdout.strip() == "ok"
        for name, site in HOSPITALS.items():
            out = (work / f"{name}.log").open("wb")
            clients.append(subprocess.Popen(
                [medfed, "client", "--server", f"127.0.0.1:{port}", "--data",
                 f"data/{site}.csv", "--certs", f"certs/hospitals/{name}", "--name", name,
                 "--workdir", f"nodes/{name}"],  # no --port: two hospitals on one host
                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True))
        deadline = time.monotonic() + RUN_S
        # the commit point is the checkpoint, written just after v0001 is published (when
        # round 2's train replies are in): a kill in between (seen with two test workers)
        # would leave round 1 uncommitted
        while _committed(run_dir) < 1:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        pids = _pids_in(run_dir / "processes.pid")  # SuperLink, flwr run, ServerApp, ...
        assert len(pids) >= 3, pids
        os.kill(server.pid, signal.SIGKILL)  # the server's main process, mid-run
        server.wait(timeout=STOP_S)
        # nothing it started outlives it: not the SuperLink, nor Flower's detached ServerApp
        assert _gone_within(pids, GONE_WITHIN_S) == [], "processes outlived `medfed server`"
        committed = _committed(run_dir)
        # killed during round 2, while v0002 waits for its evaluate replies
        assert 1 <= committed < ROUNDS_DEPLOYED

        log2 = work / "server-2.log"
        with log2.open("wb") as out:
            second = subprocess.Popen([*cmd, "--resume"], cwd=work, stdout=out,
                                      stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        code = second.wait(timeout=RUN_S)  # --exit-after-run: it ends with the run
        text = log2.read_text(errors="replace")
        assert code == 0, text[-4000:]
        _check_run(run_dir, ROUNDS_DEPLOYED, work / "certs" / "signing.pub")
        # after the resume every log counts the federation's rounds, not this start's
        flower_rounds = [tuple(map(int, m)) for m in re.findall(r"\[ROUND (\d+)/(\d+)\]", text)]
        assert flower_rounds and all(total == ROUNDS_DEPLOYED for _, total in flower_rounds), \
            flower_rounds
        assert min(r for r, _ in flower_rounds) == committed + 1, (committed, flower_rounds)
        assert re.search(rf"round {committed + 1}/{ROUNDS_DEPLOYED} ", text), text[-3000:]
        check_installed_run(medfed, health, work, env)
    finally:
        for proc in [*clients, server, *([second] if second else [])]:
            _stop(proc)


def check_installed_run(medfed: str, health: int, work: Path, env: dict[str, str]) -> None:
    """What the wheel must carry: the Flower app's entry points, the console's CSS; and the
    hospitals hold the delivered model, verified."""
    summary = json.loads((work / "server-run" / "summary.json").read_text())
    delivered = summary["final"]["version"]
    assert delivered >= 1
    app = (work / "server-run" / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "server.server_app:app"' in app
    for name in HOSPITALS:
        assert (work / "nodes" / name / "models" / f"v{delivered:04d}" / "manifest.sig").exists()
    # once the server has stopped, its healthcheck says so
    gone = _healthcheck(medfed, health, work, env)
    assert gone.returncode == 1 and "unhealthy" in gone.stderr
    report = subprocess.run([medfed, "report", "server-run", "--out", "report.html"], cwd=work,
                            env=env, capture_output=True, text=True, timeout=COMMAND_S)
    assert report.returncode == 0, report.stderr
    html = (work / "report.html").read_text()
    assert "<style>" in html and ".badge" in html and 'data-status="finished"' in html
