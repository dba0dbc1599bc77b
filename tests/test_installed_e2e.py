"""A deployment from a non-editable install, as the Docker image has it: build medfed's wheel,
install it into a fresh virtual environment, and from a directory outside the checkout run
`medfed server` (TLS, node auth, health port) with two `medfed client`s for one round.

The fresh environment borrows the test environment's third-party packages through a `.pth`
line (no network, no second torch download); medfed itself comes only from the wheel, so a
path into the checkout (PROJECT_ROOT and friends) would fail here. Flower's console scripts are
written for the fresh interpreter as pip would write them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from importlib.metadata import distribution
from pathlib import Path

import pytest

from tests.limits import COMMAND_S, INSTALL_S, RUN_S
from tests.test_deploy_e2e import _stop, _wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = INSTALL_S
RUN_TIMEOUT_S = RUN_S
HOSPITALS = ("hospital-a", "hospital-b")


def _fresh_env(tmp: Path) -> Path:
    """A venv holding medfed's wheel only, with this environment's dependencies importable."""
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, timeout=INSTALL_TIMEOUT_S, cwd=tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=INSTALL_TIMEOUT_S)
    python = venv / "bin" / "python"
    (wheel,) = wheels.glob("medfed-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", str(wheel)], check=True, timeout=INSTALL_TIMEOUT_S, cwd=tmp)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True).stdout
    # .pth lines only extend sys.path: the test env's editable-install hook is not run
    (Path(site.strip()) / "medfed-test-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    for ep in distribution("flwr").entry_points:
        if ep.group != "console_scripts":
            continue
        module, func = ep.value.split(":")
        script = venv / "bin" / ep.name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\n"
                          f"sys.exit({func}())\n", encoding="utf-8")
        script.chmod(0o755)
    return venv


def test_one_round_from_a_non_editable_install(tmp_path: Path) -> None:
    venv = _fresh_env(tmp_path)
    medfed = str(venv / "bin" / "medfed")
    work = tmp_path / "work"  # outside the checkout: nothing resolves against it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"MEDFED_HOME": str(work / "home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1"})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([medfed, *args], cwd=work, env=env, capture_output=True,
                                text=True, timeout=INSTALL_TIMEOUT_S)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        return result

    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import common, server, client; print(common.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(venv)), where.stdout  # the installed copy, not ROOT

    config = str(ROOT / "configs" / "heart.yaml")
    run("certs", "init", "--out", "certs", "--server-name", "localhost")
    entries = []
    for name in HOSPITALS:
        run("certs", "hospital", "--name", name, "--out", "certs/hospitals", "--ca", "certs")
        entries.append(f"- name: {name}\n  public_key: certs/hospitals/{name}/node_key.pub\n")
    (work / "hospitals.yaml").write_text("".join(entries), encoding="utf-8")
    run("pretrain", "--config", config, "--set", "pretrain.optim.epochs=2", "--out", "pretrain",
        "--keys", "certs/signing.key")
    run("export-heart", "--out", "data")

    from common.processes import free_port

    port, registry, health = free_port(), free_port(), free_port()
    server_log = work / "server.log"
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [medfed, "server", "--config", config, "--set", "federation.rounds=1",
             "--set", "federation.strategy.min_nodes=2",
             "--set", "federation.adaptation.enabled=false", "--bundle", "pretrain",
             "--certs", "certs", "--hospitals", "hospitals.yaml", "--port", str(port),
             "--registry-port", str(registry), "--health-port", str(health),
             "--run-dir", "server-run", "--exit-after-run"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        assert _wait_for(server_log, "model registry on", COMMAND_S, server), server_log.read_text()
        deadline = time.monotonic() + COMMAND_S
        while (check := subprocess.run(
                [medfed, "healthcheck", "--port", str(health), "--run-dir", "server-run"],
                cwd=work, env=env, capture_output=True, text=True, timeout=COMMAND_S)).returncode:
            assert time.monotonic() < deadline, check.stderr
            time.sleep(1)
        assert check.stdout.strip() == "ok"
        for name, site in zip(HOSPITALS, ("cleveland", "hungary"), strict=True):
            log = (work / f"{name}.log").open("wb")
            clients.append(subprocess.Popen(
                [medfed, "client", "--server", f"127.0.0.1:{port}", "--data",
                 f"data/{site}.csv", "--certs", f"certs/hospitals/{name}", "--name", name,
                 "--workdir", f"nodes/{name}"],  # no --port: two hospitals on one host
                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
        code = server.wait(timeout=RUN_TIMEOUT_S)
        text = server_log.read_text(errors="replace")
        assert code == 0, text[-4000:]
        summary = json.loads((work / "server-run" / "summary.json").read_text())
        assert summary["final"]["version"] >= 1
        app = (work / "server-run" / "app" / "pyproject.toml").read_text()
        assert 'serverapp = "server.server_app:app"' in app
        for name in HOSPITALS:
            assert (work / "nodes" / name / "models" / "v0001" / "manifest.sig").exists()
        # once the server has stopped, its healthcheck says so
        gone = subprocess.run([medfed, "healthcheck", "--port", str(health), "--run-dir",
                               "server-run"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=COMMAND_S)
        assert gone.returncode == 1 and "unhealthy" in gone.stderr
        # the console's report works from the wheel: its CSS is package data
        report = subprocess.run([medfed, "report", "server-run", "--out", "report.html"],
                                cwd=work, env=env, capture_output=True, text=True,
                                timeout=COMMAND_S)
        assert report.returncode == 0, report.stderr
        html = (work / "report.html").read_text()
        assert "<style>" in html and ".badge" in html and 'data-status="finished"' in html
    finally:
        for proc in [*clients, server]:
            _stop(proc)
