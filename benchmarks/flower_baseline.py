"""A plain Flower app deployed like medfed: the yardstick for medfed's deployment round time.

Written for this benchmark, following Flower 1.42's Message API (../shared/notes/flower.md
§2): a 16 -> 2 linear head trained on 200 random rows per node, 20 local steps, FedAvg with
federated evaluation every round and a server-side evaluation function, `flwr run` against
`flower-superlink` with two `flower-supernode`s, all `--insecure` on 127.0.0.1. The ServerApp
appends the time of each round's end to a file; round time = the difference between
consecutive ends (round 0 is the initial evaluation), as medfed's metrics.jsonl gives it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.util import stop_group
from common.processes import free_port, wait_for_port

APP_PY = '''\
"""Plain Flower app (benchmark yardstick): tiny linear head, FedAvg, federated evaluation."""
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client = ClientApp()
server = ServerApp()


def _data(context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(context.node_config.get("seed", 0)))
    x = torch.randn(200, 16, generator=gen)
    y = (x[:, 0] > 0).long()
    return x, y


@client.train()
def train(msg: Message, context: Context) -> Message:
    head = torch.nn.Linear(16, 2)
    head.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context)
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        opt.step()
    return Message(RecordDict({"arrays": ArrayRecord(head.state_dict()),
                               "metrics": MetricRecord({"num-examples": len(y),
                                                        "loss": float(loss)})}), reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    head = torch.nn.Linear(16, 2)
    head.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(context)
    with torch.no_grad():
        acc = float((head(x).argmax(1) == y).float().mean())
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(y),
                                                        "accuracy": acc})}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    ends = Path(str(context.run_config["ends-file"]))
    rounds = int(context.run_config["rounds"])

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        with ends.open("a") as fh:
            fh.write(f"{server_round} {time.time()}\\n")
        return MetricRecord({"round": server_round})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=2)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(torch.nn.Linear(16, 2).state_dict()),
                   num_rounds=rounds, evaluate_fn=central)
'''

PYPROJECT = '''\
[project]
name = "flower-baseline"
version = "1.0.0"
description = "plain Flower app for medfed's deployment benchmark"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medfed-bench"

[tool.flwr.app.components]
serverapp = "baseline_app:server"
clientapp = "baseline_app:client"

[tool.flwr.app.config]
rounds = {rounds}
ends-file = "{ends}"
'''


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def run_baseline(root: Path, rounds: int, nodes: int = 2, timeout: float = 900.0
                 ) -> dict[str, Any]:
    """One run: the plain app's per-round times (round 1 apart)."""
    app = root / "app"
    app.mkdir(parents=True, exist_ok=True)
    ends = root / "round-ends.txt"
    (app / "baseline_app.py").write_text(APP_PY, encoding="utf-8")
    (app / "pyproject.toml").write_text(PYPROJECT.format(rounds=rounds, ends=ends),
                                        encoding="utf-8")
    port = free_port()
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n", encoding="utf-8")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    procs = [_start([_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                     str(port), "--database", str(root / "state.db"),
                     "--disable-runtime-dependency-installation"], root / "superlink.log", env)]
    try:
        if not wait_for_port("127.0.0.1", port, 120.0, procs[0]):
            raise RuntimeError(f"flower-superlink did not start; see {root}/superlink.log")
        for i in range(nodes):
            procs.append(_start([_bin("flower-supernode"), "--insecure", "--superlink",
                                 f"127.0.0.1:{port}", "--port", str(free_port()),
                                 "--node-config", f"seed={i}"],
                                root / f"supernode-{i}.log", env))
        submit = subprocess.run([_bin("flwr"), "run", str(app), "bench", "--stream"], env=env,
                                capture_output=True, text=True, timeout=timeout)
        (root / "flwr-run.log").write_text(submit.stdout + submit.stderr, encoding="utf-8")
    finally:
        for proc in reversed(procs):
            stop_group(proc)
    marks = [float(line.split()[1]) for line in ends.read_text().splitlines()] \
        if ends.exists() else []
    if submit.returncode != 0 or len(marks) < rounds + 1:
        raise RuntimeError(f"plain Flower run failed ({submit.returncode}, {len(marks) - 1} of "
                           f"{rounds} rounds); see {root}/flwr-run.log")
    times = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return {"rounds": rounds, "round_s": times, "first_round_s": times[0],
            "per_round_s": sum(times[1:]) / len(times[1:])}


if __name__ == "__main__":
    print(json.dumps(run_baseline(Path(sys.argv[1]), int(sys.argv[2]))))
