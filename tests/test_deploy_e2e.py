"""Real deployment on 127.0.0.1: `medfed certs` -> `medfed server` (flower-superlink with TLS and
node auth) -> `medfed client` processes (flower-supernode) with the heart hospitals, on one host
without `--port` -> 2 rounds -> `medfed pull` over mutual TLS -> `medfed predict`. A fourth
hospital whose CSV lacks a column leaves with one sentence while the others finish. Plus the
refusals (unregistered key, wrong CA, TLS mode mismatch, taken ports, unreachable server), a
client that starts before its registration, the hospital's own log, and SIGKILL of a client.

Every process is started in its own process group and stopped in a finalizer, also when a
test fails.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.deploy import ClientRequest, supernode_cmd
from common.certs import check_hospital_certs, init_federation, init_hospital
from common.config_check import load_config
from common.data.heart import export_site_csv
from common.pretrain import pretrain
from common.processes import alive, free_port
from common.signing import load_private_key
from tests.limits import COMMAND_S, RUN_S, STOP_S
from tests.tls_helpers import REFUSED, https_get, tls_context

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SITES = ("cleveland", "hungary", "va")
MALICIOUS = "va"  # in the full run its SuperNode claims 1e300 training rows (client/faults.py)
BAD_DATA = "switzerland"  # registered, but its CSV lacks the column 'chol'
VA_ENROLLED = 60
RUN_TIMEOUT_S = RUN_S


def medfed(*args: str) -> list[str]:
    return [sys.executable, "-m", "medfed.cli", *args]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MEDFED_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1"}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; make sure nobody else of its group is left
        time.sleep(0.5)


def _wait_for(path: Path, text: str, timeout: float, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


@dataclass
class Federation:
    tmp: Path
    certs: Path
    hospitals: Path
    bundle: Path
    data: Path
    port: int
    registry_port: int
    run_dir: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    tmp = tmp_path_factory.mktemp("deploy")
    certs = tmp / "certs"
    init_federation(certs, ["localhost"], [])
    entries = []
    for site in SITES:
        paths = init_hospital(site, certs / "hospitals", certs)
        entries.append(f"- name: {site}\n  public_key: {paths.node_pub}\n"
                       # the operator knows VA's size: whatever VA claims, it weighs <= 60
                       + (f"  max_examples: {VA_ENROLLED}\n" if site == MALICIOUS else ""))
    paths = init_hospital(BAD_DATA, certs / "hospitals", certs)
    entries.append(f"- name: {BAD_DATA}\n  public_key: {paths.node_pub}\n")
    init_hospital("intruder", certs / "hospitals", certs)  # has a key, but never registered
    hospitals = tmp / "hospitals.yaml"
    hospitals.write_text("".join(entries), encoding="utf-8")
    cfg = load_config(ROOT / "configs" / "heart.yaml", ["pretrain.optim.epochs=5"])
    bundle = tmp / "pretrain"
    pretrain(cfg, bundle, load_private_key(certs / "signing.key"))
    data = tmp / "data"
    for site in SITES:
        export_site_csv(site, data / f"{site}.csv")
    export_site_csv(BAD_DATA, data / f"{BAD_DATA}.csv")
    with (data / f"{BAD_DATA}.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with (data / f"{BAD_DATA}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, [k for k in rows[0] if k != "chol"])
        writer.writeheader()
        writer.writerows([{k: v for k, v in r.items() if k != "chol"} for r in rows])
    return Federation(tmp, certs, hospitals, bundle, data, free_port(), free_port(),
                      tmp / "server-run", _env(tmp / "home"))


@pytest.fixture(scope="module")
def server(federation: Federation) -> Iterator[subprocess.Popen[bytes]]:
    f = federation
    log = f.tmp / "server.log"
    cmd = medfed("server", "--config", str(ROOT / "configs" / "heart.yaml"),
                 "--set", "federation.rounds=2", "--set", "federation.strategy.min_nodes=3",
                 "--set", "federation.adaptation.enabled=false",
                 "--bundle", str(f.bundle), "--certs", str(f.certs),
                 "--hospitals", str(f.hospitals), "--port", str(f.port),
                 "--registry-port", str(f.registry_port), "--run-dir", str(f.run_dir))
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=f.env,
                                start_new_session=True)
    try:
        assert _wait_for(log, "model registry on", COMMAND_S, proc), log.read_text(errors="replace")
        yield proc
    finally:
        _stop(proc)


def _malicious_client(f: Federation, name: str, certs: Path) -> subprocess.Popen[bytes]:
    """A hospital that changed its own client: the real SuperNode, lying about its size."""
    req = ClientRequest(server=f"127.0.0.1:{f.port}", data=f.data / f"{name}.csv",
                        test_data=None, certs=certs, name=name, device="cpu",
                        workdir=f.tmp / "nodes" / name, port=free_port(), insecure=False,
                        max_retries=0)
    cmd = supernode_cmd(req, check_hospital_certs(certs))
    at = cmd.index("--node-config") + 1
    cmd[at] += ' attack="inflate-count"'
    out = (f.tmp / f"client-{name}.log").open("wb")
    # as `medfed client` does: the SuperNode starts `flower-superexec` from PATH
    env = {**f.env, "FLWR_HOME": str(f.tmp / "nodes" / name / "flwr-home"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + f.env.get("PATH", "")}
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _client(f: Federation, name: str, certs: Path, extra: tuple[str, ...] = (),
            server: str | None = None) -> subprocess.Popen[bytes]:
    """`medfed client` as a hospital runs it: no --port (several hospitals share this host)."""
    log = f.tmp / f"client-{name}.log"
    out = log.open("wb")
    data = f.data / f"{name}.csv"
    cmd = medfed("client", "--server", server or f"127.0.0.1:{f.port}", "--data",
                 str(data if data.exists() else f.data / f"{SITES[0]}.csv"),
                 "--certs", str(certs), "--name", name,
                 "--workdir", str(f.tmp / "nodes" / name), *extra)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=f.env,
                            start_new_session=True)


def _finished(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        _stop(proc)


def _pids_in(pid_file: Path) -> list[int]:
    """The processes a medfed command recorded (its watchdog keeps the list current)."""
    return [int(line) for line in pid_file.read_text().splitlines() if line.isdigit()]


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_server_refuses_to_start_without_certificates(federation: Federation) -> None:
    f = federation
    run_dir = f.tmp / "no-certs-run"
    result = subprocess.run(
        medfed("server", "--config", str(ROOT / "configs" / "heart.yaml"), "--bundle",
               str(f.bundle), "--port", str(free_port()), "--run-dir", str(run_dir)),
        capture_output=True, text=True, env=f.env, timeout=COMMAND_S)
    assert result.returncode == 2
    assert "refusing to start without certificates" in result.stderr
    assert not run_dir.exists()  # nothing written


def test_client_with_unregistered_key_is_refused(federation: Federation,
                                                 server: subprocess.Popen[bytes]) -> None:
    f = federation
    proc = _client(f, "intruder", f.certs / "hospitals" / "intruder",
                   ("--wait-registration", "0"))
    code = _finished(proc, COMMAND_S)
    text = (f.tmp / "client-intruder.log").read_text(errors="replace")
    assert code == 3
    assert "medfed: error: hospital intruder: the server refused this hospital's node key: it " \
        "is not registered" in text
    assert "Traceback" not in text
    assert not (f.tmp / "nodes" / "intruder" / "models").exists()
    # the operator sees the refused join in the server's own log
    assert _wait_for(f.tmp / "server.log", "refused a join: a node key that is not registered",
                     30, server)


def test_client_with_wrong_ca_is_refused(federation: Federation,
                                         server: subprocess.Popen[bytes]) -> None:
    f = federation
    other = f.tmp / "other-federation"
    init_federation(other, ["localhost"], [])
    stranger = init_hospital("stranger", other / "hospitals", other)
    proc = _client(f, "stranger", stranger.out, ("--max-retries", "3"))
    code = _finished(proc, COMMAND_S)
    text = (f.tmp / "client-stranger.log").read_text(errors="replace")
    assert code == 3
    assert "federation CA" in text, text[-2000:]
    assert "Traceback" not in text  # Flower's own output stays in supernode.log


def test_insecure_client_against_tls_server_names_the_mismatch(
        federation: Federation, server: subprocess.Popen[bytes]) -> None:
    f = federation
    home = Path(f.env["MEDFED_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(f.certs / "signing.pub", home / "signing.pub")
    name = "plain"
    log = f.tmp / f"client-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            medfed("client", "--server", f"127.0.0.1:{f.port}", "--data",
                   str(f.data / "cleveland.csv"), "--name", name, "--insecure",
                   "--workdir", str(f.tmp / "nodes" / name), "--give-up-after", "10"),
            stdout=out, stderr=subprocess.STDOUT, env=f.env, start_new_session=True)
    code = _finished(proc, COMMAND_S)
    text = log.read_text(errors="replace")
    assert code == 3
    assert "uses TLS but this hospital was started with --insecure" in text, text[-2000:]


def test_unreachable_server_gives_up_after_the_bounded_wait(federation: Federation) -> None:
    f = federation
    proc = _client(f, "cleveland-offline", f.certs / "hospitals" / "cleveland",
                   ("--give-up-after", "8"), server=f"127.0.0.1:{free_port()}")
    code = _finished(proc, COMMAND_S)
    text = (f.tmp / "client-cleveland-offline.log").read_text(errors="replace")
    assert code == 3
    assert "cannot reach the server at 127.0.0.1:" in text and "for 8 s" in text, text[-2000:]
    assert "Traceback" not in text


def test_second_server_on_taken_ports_refuses_before_registering(
        federation: Federation, server: subprocess.Popen[bytes]) -> None:
    f = federation
    run_dir = f.tmp / "second-server"
    result = subprocess.run(
        medfed("server", "--config", str(ROOT / "configs" / "heart.yaml"), "--bundle",
               str(f.bundle), "--certs", str(f.certs), "--hospitals", str(f.hospitals),
               "--port", str(f.port), "--registry-port", str(free_port()),
               "--run-dir", str(run_dir)),
        capture_output=True, text=True, env=f.env, timeout=COMMAND_S)
    assert result.returncode == 2, result.stderr
    assert f"port {f.port} on 127.0.0.1 (--port) is in use" in result.stderr
    assert "registered" not in result.stdout + result.stderr
    assert not run_dir.exists()
    assert server.poll() is None  # the first server is untouched


def test_full_run_pull_and_predict(federation: Federation,
                                   server: subprocess.Popen[bytes]) -> None:
    f = federation
    clients = [(_malicious_client if site == MALICIOUS else _client)(
        f, site, f.certs / "hospitals" / site) for site in SITES]
    bad = _client(f, BAD_DATA, f.certs / "hospitals" / BAD_DATA)
    clients.append(bad)
    try:
        log = f.tmp / "server.log"
        assert _wait_for(log, "still serving the registry", RUN_TIMEOUT_S, server), \
            log.read_text(errors="replace")[-4000:]
        # the hospital with a bad CSV left with one sentence, named by its registered name
        assert bad.wait(timeout=COMMAND_S) == 2
        bad_text = (f.tmp / f"client-{BAD_DATA}.log").read_text(errors="replace")
        assert f"medfed: error: hospital {BAD_DATA}: its data does not match the model: " \
            in bad_text and "missing column(s) 'chol'" in bad_text, bad_text[-2000:]
        assert "Traceback" not in bad_text
        assert f"{BAD_DATA} left: its data does not match the model's schema (its data file: " \
            "missing column(s) 'chol')" in log.read_text(errors="replace")
        # the liar's updates count, with the weight its enrolment allows
        assert f"capped the weight of {MALICIOUS}: it claimed 1e+300 training rows, the bound " \
            f"is {VA_ENROLLED}" in log.read_text(errors="replace")
        assert (f.run_dir / "registry" / "v0002" / "manifest.sig").exists()
        delivered = json.loads((f.run_dir / "summary.json").read_text())["final"]["version"]

        out = f.tmp / "pulled"
        pulled = subprocess.run(
            medfed("pull", "--server", f"127.0.0.1:{f.registry_port}", "--certs",
                   str(f.certs / "hospitals" / "va"), "--version", "latest", "--out", str(out)),
            capture_output=True, text=True, env=f.env, timeout=COMMAND_S)
        assert pulled.returncode == 0, pulled.stderr
        assert "v0002" in pulled.stdout
        check_console(f, delivered)

        # a global model normalised per site needs the hospital's own statistics
        stats = f.tmp / "nodes" / "va" / "models" / "site_stats.json"
        for model, extra in ((out, ("--site-stats", str(stats))),
                             (f.tmp / "nodes" / "va" / "personalised", ())):
            preds = f.tmp / "preds.csv"
            predicted = subprocess.run(
                medfed("predict", "--model", str(model), "--data", str(f.data / "va.csv"),
                       "--out", str(preds), "--public-key", str(f.certs / "signing.pub"),
                       *extra),
                capture_output=True, text=True, env=f.env, timeout=COMMAND_S)
            assert predicted.returncode == 0, predicted.stderr
            with (f.data / "va.csv").open() as fh:
                n_input = sum(1 for _ in fh) - 1
            with preds.open() as fh:
                rows = list(csv.DictReader(fh))
            assert len(rows) == n_input
            for row in rows:
                total = float(row["p_no disease"]) + float(row["p_disease"])
                assert abs(total - 1.0) < 1e-5

        # every hospital received the delivered model and its own site model, verified
        for site in SITES:
            node = f.tmp / "nodes" / site
            assert (node / "models" / f"v{delivered:04d}" / "manifest.sig").exists()
            manifest = json.loads((node / "personalised" / "manifest.json").read_text())
            assert manifest["site"]["name"] == site
        check_what_left_the_sites(f.run_dir / "audit.jsonl")
        check_hospital_log(f, SITES[0], delivered)
        # SIGKILL of `medfed client`: its SuperNode and everything under it go too
        node = f.tmp / "nodes" / SITES[0]
        pids = _pids_in(node / "processes.pid")
        assert len(pids) >= 2  # the SuperNode and Flower's detached SuperExec at least
        os.kill(clients[0].pid, signal.SIGKILL)
        assert _gone_within(pids, 10.0) == [], "processes outlived `medfed client`"
    finally:
        for proc in clients:
            _stop(proc)


def check_console(f: Federation, delivered: int) -> None:
    """`medfed server` serves the console at /console to enrolled hospitals only."""
    hospital = f.certs / "hospitals" / "va"
    with pytest.raises(REFUSED):
        https_get(f.registry_port, tls_context(hospital / "ca.crt"), "/console/api/runs")
    context = tls_context(hospital / "ca.crt", hospital / "client.pem", hospital / "client.key")
    status, body = https_get(f.registry_port, context, "/console/api/runs")
    assert status == 200, body[:500]
    (run,) = json.loads(body)["runs"]
    assert (run["status"], run["rounds_done"]) == ("finished", 2)  # summary written
    status, body = https_get(f.registry_port, context,
                              f"/console/api/runs/{run['name']}/versions")
    versions = json.loads(body)
    assert status == 200 and {v["signature"] for v in versions["versions"]} == {"verified"}
    assert versions["pointers"]["latest"]["version"] == 2
    status, body = https_get(f.registry_port, context,
                              f"/console/api/runs/{run['name']}/hospitals")
    listed = {h["site"]: h for h in json.loads(body)["hospitals"]}
    assert set(SITES) <= set(listed) and all(listed[s]["trained_rounds"] == [1, 2]
                                             for s in SITES)
    assert delivered in {v["version"] for v in versions["versions"]}
    # a certificate of the federation's CA whose hospital is not in the hospitals file
    intruder = f.certs / "hospitals" / "intruder"
    context = tls_context(intruder / "ca.crt", intruder / "client.pem", intruder / "client.key")
    for path in ("/console/api/runs", "/v1/versions"):
        status, body = https_get(f.registry_port, context, path)
        assert status == 403 and b"'intruder', which is not enrolled" in body, (path, body)


def check_hospital_log(f: Federation, site: str, delivered: int) -> None:
    """The hospital's terminal: timestamped sentences for what happened; the same events in
    `<workdir>/events.jsonl`."""
    text = (f.tmp / f"client-{site}.log").read_text(errors="replace")
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d " + re.escape(site) + ": "
    for sentence in (r"starting hospital .*TLS", r"joined the federation as node \d+",
                     r"backbone [0-9a-f]{12} received and verified \(signed manifest\)",
                     r"round 1: trained on \d+ local rows, \d+ steps, loss \d",
                     r"round 2: local validation \(\d+ rows\) AUC \d\.\d{3}",
                     rf"model v{delivered:04d} delivered and verified"):
        assert re.search(stamp + sentence, text), (sentence, text[-3000:])
    assert "Receiving:" not in text  # Flower's chatter is in supernode.log
    events = [json.loads(line) for line in
              (f.tmp / "nodes" / site / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert {"start", "joined", "backbone", "train", "evaluate", "model"} <= set(kinds)
    assert all(e["time"].endswith("+00:00") for e in events)
    trained = [e for e in events if e["event"] == "train"]
    assert sorted({e["round"] for e in trained}) == [1, 2]
    assert all(e["rows"] > 0 and e["steps"] > 0 for e in trained)


def test_client_started_before_its_registration_joins_once_registered(
        federation: Federation, server: subprocess.Popen[bytes]) -> None:
    f = federation
    late = init_hospital("late", f.certs / "hospitals", f.certs)
    proc = _client(f, "late", late.out)
    log = f.tmp / "client-late.log"
    try:
        assert _wait_for(log, "not registered (yet)", COMMAND_S, proc), log.read_text()
        # the operator registers it now, with the server's own Flower connection
        flwr_env = {**f.env, "FLWR_HOME": str(f.run_dir / "flwr-home")}
        registered = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "supernode", "register",
             str(late.node_pub), "medfed", "--name", "late"],
            capture_output=True, text=True, env=flwr_env, timeout=COMMAND_S)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        assert _wait_for(log, "joined the federation as node", COMMAND_S, proc), log.read_text()
    finally:
        _stop(proc)


ALLOWED_METRICS = {
    "train": {"num-examples", "loss", "steps"},
    "query.backbone": {"has-backbone", "num-train", "rows/train", "rows/validation",
                       "rows/test"},
    "query.save_model": {"saved-version"},
    "query.save_site_model": {"saved"},
}
# a site model reply: its choice, operating point, counts and metrics, no patient value
SITE_MODEL_METRIC = re.compile(r"kept-adapted|steps|temperature|threshold|rows/\w+|"
                               r"(site_model|global)/(validation|test)/\w+")
SITE_MODEL_WORDS = {"method", "reason", "rule", "fitted-on", "notes",
                    "sha256/backbone.safetensors", "sha256/head.safetensors",
                    "sha256/site_stats.json"}


def check_what_left_the_sites(audit: Path) -> None:
    """Every reply a hospital sent: only the trainable tensors, counts and scalar metrics."""
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    kinds = {e["type"] for e in entries}
    assert {"train", "evaluate", "query.backbone", "query.save_model", "query.adapt",
            "query.save_site_model"} <= kinds
    for e in entries:
        if "error" in e:  # nothing failed in this run but the refusal of the bad CSV
            assert e["type"] == "query.backbone" and "data-refused" in e["error"], e
            continue
        arrays = e["arrays"]
        if e["type"] == "train":
            assert {k: v["shape"] for k, v in arrays.items()} == {
                "arrays/head.weight": [2, 16], "arrays/head.bias": [2]}
        else:
            assert arrays == {}
        for key, value in e["metrics"].items():
            assert isinstance(value, int | float), (key, value)
            record, name = key.split("/", 1)
            assert record == "metrics"
            if e["type"] in ALLOWED_METRICS:
                assert name in ALLOWED_METRICS[e["type"]], (e["type"], name)
            if e["type"] == "query.adapt":
                assert SITE_MODEL_METRIC.fullmatch(name), name
        # the text a site sends: its own name, and how it chose its site model
        words = {k for k in e["configs"] if k != "site/name"}
        assert words <= {f"site-model/{w}" for w in SITE_MODEL_WORDS}, words
        assert e["configs"].get("site/name", SITES[0]) in SITES


def test_pull_without_client_certificate_is_refused(federation: Federation,
                                                    server: subprocess.Popen[bytes]) -> None:
    f = federation
    out = f.tmp / "pulled-nocert"
    result = subprocess.run(
        medfed("pull", "--server", f"127.0.0.1:{f.registry_port}", "--certs", str(f.certs),
               "--version", "latest", "--out", str(out)),
        capture_output=True, text=True, env=f.env, timeout=COMMAND_S)
    assert result.returncode == 2
    assert "client.pem" in result.stderr
    assert not out.exists()


def test_bundle_with_wrong_signature_is_refused(federation: Federation,
                                                server: subprocess.Popen[bytes]) -> None:
    f = federation
    other = f.tmp / "other-keys"
    init_federation(other, ["localhost"], [])
    out = f.tmp / "pulled-wrongkey"
    result = subprocess.run(
        medfed("pull", "--registry", str(f.run_dir / "registry"), "--version", "latest",
               "--out", str(out), "--public-key", str(other / "signing.pub")),
        capture_output=True, text=True, env=f.env, timeout=COMMAND_S)
    assert result.returncode == 2
    assert "signature" in result.stderr
    assert not out.exists()
