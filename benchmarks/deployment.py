"""Benchmark 6: per-round latency of a real deployment on loopback.

`medfed server` (flower-superlink + `flwr run`) and N `medfed client` processes
(flower-supernode), all on 127.0.0.1: with TLS and registered node keys, and `--insecure`
(plain HTTP, no node auth). Hospitals use the exported heart CSVs (hospital i gets centre
i mod 4). Per-round latency is the difference of `elapsed_s` between consecutive rounds in the
server's metrics.jsonl (train phase + federated evaluation + held-out check + publication);
round 1 also provisions the backbone and is reported apart. Wire bytes are Flower's own
per-run traffic counters in the SuperLink database (what `flwr ls` shows).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.util import ROOT, WORK, bench_env, fmt, md_table, medfed, stop_group
from common.certs import init_federation, init_hospital
from common.config_check import load_config
from common.data.heart import SITE_FILES, export_site_csv
from common.pretrain import pretrain
from common.processes import free_port
from common.signing import load_private_key

CONFIG = ROOT / "configs" / "heart.yaml"
ROUNDS = 3
TIMEOUT_S = 900.0
# Flower 1.41's polling intervals (source lines in RESULTS.md): a SuperNode with nothing to do
# asks again after 3 s; the ServerApp's Grid re-pulls missing replies every 3 s; SuperExec
# looks for new app processes to start every 1 s.
POLL_S = {"supernode_idle_poll": 3.0, "grid_reply_poll": 3.0, "superexec_task_poll": 1.0}


def _setup(root: Path, hospitals: int) -> dict[str, Any]:
    """Certificates, node keys, the signed bundle and the hospitals' CSVs."""
    certs = root / "certs"
    init_federation(certs, ["localhost"], [])
    names = [f"hospital-{i:02d}" for i in range(hospitals)]
    keys = [init_hospital(n, certs / "hospitals", certs).node_pub for n in names]
    entries = [f"- name: {n}\n  public_key: {k}\n" for n, k in zip(names, keys, strict=True)]
    (root / "hospitals.yaml").write_text("".join(entries), encoding="utf-8")
    cfg = load_config(CONFIG, ["pretrain.optim.epochs=5"])
    pretrain(cfg, root / "bundle", load_private_key(certs / "signing.key"))
    sites = list(SITE_FILES)
    for i, name in enumerate(names):
        export_site_csv(sites[i % len(sites)], root / "data" / f"{name}.csv")
    return {"certs": certs, "names": names}


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)


def _wait_text(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"'{text}' did not appear in {log}:\n{tail}")


def wire_bytes(db: Path) -> dict[str, int] | None:
    """Flower's per-run traffic counters (Fleet API messages and objects) from the database."""
    try:
        with sqlite3.connect(db) as con:
            row = con.execute("SELECT bytes_sent, bytes_recv FROM run ORDER BY rowid DESC LIMIT 1"
                              ).fetchone()
    except sqlite3.Error:
        return None
    return {"to_nodes": int(row[0]), "from_nodes": int(row[1])} if row else None


def deploy_run(hospitals: int, tls: bool, root: Path, rounds: int = ROUNDS) -> dict[str, Any]:
    """One run of `rounds` rounds; per-round latencies and wire bytes."""
    setup = _setup(root, hospitals)
    env = bench_env(root / "home")
    run_dir, port = root / "server-run", free_port()
    security = (["--certs", str(setup["certs"]), "--hospitals", str(root / "hospitals.yaml")]
                if tls else ["--certs", str(setup["certs"]), "--insecure"])
    server_log = root / "server.log"
    server = _start(medfed("server", "--config", str(CONFIG),
                           "--set", f"federation.rounds={rounds}",
                           "--set", f"federation.strategy.min_nodes={hospitals}",
                           "--set", "federation.adaptation.enabled=false",
                           "--bundle", str(root / "bundle"), *security, "--port", str(port),
                           "--registry-port", str(free_port()), "--run-dir", str(run_dir),
                           "--exit-after-run"), server_log, env)
    clients: list[subprocess.Popen[bytes]] = []
    try:
        # with TLS the hospitals are registered after the SuperLink starts; the registry
        # line comes after the last registration, so no client is refused for being early
        _wait_text(server_log, "model registry on" if tls else "SuperLink listening", server,
                   120)
        if not tls:  # no TLS, but models are still verified: with $MEDFED_HOME/signing.pub
            (root / "home").mkdir(parents=True, exist_ok=True)
            shutil.copy(setup["certs"] / "signing.pub", root / "home" / "signing.pub")
        for name in setup["names"]:
            creds = (["--certs", str(setup["certs"] / "hospitals" / name)] if tls
                     else ["--insecure"])
            clients.append(_start(medfed("client", "--server", f"127.0.0.1:{port}", "--data",
                                         str(root / "data" / f"{name}.csv"), *creds, "--name",
                                         name, "--port", str(free_port()), "--workdir",
                                         str(root / "nodes" / name)),
                                  root / f"client-{name}.log", env))
        code = server.wait(timeout=TIMEOUT_S)
    finally:
        for proc in [*clients, server]:
            stop_group(proc)
    metrics = run_dir / "metrics.jsonl"
    if code != 0 or not metrics.exists():
        raise RuntimeError(f"deployment run failed ({code}); see {server_log}")
    elapsed = [json.loads(line)["elapsed_s"] for line in metrics.read_text().splitlines()]
    if len(elapsed) < rounds + 1:
        raise RuntimeError(f"deployment run completed {len(elapsed) - 1} of {rounds} rounds; "
                           f"see {server_log}")
    times = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    return {"hospitals": hospitals, "tls": tls, "rounds": rounds, "round_s": times,
            "first_round_s": times[0], "per_round_s": statistics.fmean(times[1:]),
            "wire_bytes": wire_bytes(run_dir / "superlink.db")}


def run(quick: bool) -> dict[str, Any]:
    """TLS and insecure alternately (2 hospitals, twice each, 4 rounds), then TLS with 5 and
    10 hospitals (3 rounds); quick: one TLS and one insecure run, 2 rounds."""
    pair = [(2, True, 2), (2, False, 2)] if quick else [(2, True, 4), (2, False, 4)] * 2
    cases = pair if quick else [*pair, (5, True, ROUNDS), (10, True, ROUNDS)]
    base = WORK / "deployment"
    rows = []
    for i, (hospitals, tls, rounds) in enumerate(cases):
        root = base / f"{i}-{hospitals}-{'tls' if tls else 'insecure'}"
        if root.exists():
            shutil.rmtree(root)
        rows.append(deploy_run(hospitals, tls, root, rounds))
        print(f"  deployment {hospitals} hospitals {'TLS' if tls else 'insecure'}: "
              f"{rows[-1]['per_round_s']:.1f} s/round", flush=True)

    return {"rows": rows, "polling_s": POLL_S, "config": str(CONFIG.relative_to(ROOT)),
            **tls_ratio(rows)}


def tls_ratio(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """TLS vs insecure from the alternated 2-hospital runs.

    Each mode's figure is its fastest run (mean of rounds 2+): other jobs on a shared machine
    only ever add time, so the least disturbed run is the best estimate of each mode's cost.
    The pooled means of all rounds are kept beside it.
    """
    def runs(tls: bool) -> list[dict[str, Any]]:
        return [r for r in rows if r["hospitals"] == 2 and r["tls"] == tls]

    def pooled(tls: bool) -> float:
        return statistics.fmean([t for r in runs(tls) for t in r["round_s"][1:]])

    best = {tls: min(r["per_round_s"] for r in runs(tls)) for tls in (True, False)}
    return {
        "tls_per_round_s": best[True], "insecure_per_round_s": best[False],
        "tls_pooled_mean_s": pooled(True), "insecure_pooled_mean_s": pooled(False),
        "headline": {"tls_latency_ratio": best[True] / best[False]},
    }


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    table = []
    for r in res["rows"]:
        wire = r["wire_bytes"] or {}
        table.append([str(r["hospitals"]), "TLS + node auth" if r["tls"] else "insecure",
                      str(r["rounds"]),
                      f"{r['first_round_s']:.1f} s", f"{r['per_round_s']:.1f} s",
                      ", ".join(f"{t:.1f}" for t in r["round_s"]),
                      str(wire.get("from_nodes", "—")), str(wire.get("to_nodes", "—"))])
    return "\n\n".join([
        f"`{res['config']}` (heart MLP head, adaptation off), every process on 127.0.0.1. "
        "Round time = train + federated evaluation + held-out check + signed publication; "
        "rounds 2+ exclude backbone provisioning.",
        md_table(["hospitals", "security", "rounds", "round 1", "mean of rounds 2+",
                  "all rounds (s)", "wire bytes from nodes", "wire bytes to nodes"], table),
        "TLS / insecure latency ratio (2 hospitals, runs alternated TLS, insecure, TLS, "
        "insecure; each mode's fastest run, rounds 2+): "
        f"{res['tls_per_round_s']:.1f} s / {res['insecure_per_round_s']:.1f} s = "
        f"{fmt(res['headline']['tls_latency_ratio'], 2)} (means over all their rounds 2+: "
        f"{res['tls_pooled_mean_s']:.1f} s / {res['insecure_pooled_mean_s']:.1f} s; other jobs "
        "only add time, so the fastest run is the least disturbed one).",
    ])

