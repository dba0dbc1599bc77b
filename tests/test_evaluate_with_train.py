"""`federation.evaluate_with_train`: one message per node per round, the same versions.

Each train message also scores the global model it carries; version r is published when
round r+1's replies arrive, and the last version gets evaluate messages of its own. Runs the
real ServerApp and ClientApp code in this process (no Ray) on the four heart hospitals, with
FedAdam (state carried between rounds), and checks resumes in both modes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from client.client_app import make_client_app
from common import records as rk
from common.config import ConfigError
from common.config_check import load_config
from server.checkpoint import load_checkpoint
from server.federation import run_federation
from tests.conftest import HEART
from tests.flower_helpers import task_identity
from tests.inprocess_grid import FIRST_NODE, InProcessGrid, run_settings

FAST = ("federation.rounds=3", "federation.local.steps=3", "federation.adaptation.enabled=false",
        "federation.strategy.name=fedadam")
FOLD = "federation.evaluate_with_train=true"
HOSPITALS = 4


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity():
        yield


class Interrupted(BaseException):
    """The server process dies (no error reply, no cleanup): what kill -9 leaves behind."""


def _dies_in_round(server_round: int) -> Callable[[Message, Message], Message]:
    """A reply hook: the server dies when it sends round `server_round`'s train messages."""
    def hook(msg: Message, reply: Message) -> Message:
        config = msg.content.config_records.get(rk.CONFIG)
        if msg.metadata.message_type == "train" and config and \
                config[rk.SERVER_ROUND] == server_round:
            raise Interrupted
        return reply
    return hook


def _run(run_dir: Path, bundle: Path, keys: Path, *overrides: str,
         reply: Callable[[Message, Message], Message] | None = None, resume: bool = False,
         ) -> tuple[InProcessGrid, list[dict[str, Any]]]:
    settings = replace(run_settings(HEART, (*FAST, *overrides), run_dir, bundle, keys),
                       resume=resume)
    app = make_client_app(settings)

    def handle(msg: Message, context: Context) -> Message:
        out = app(msg, context)
        return reply(msg, out) if reply is not None else out

    grid = InProcessGrid(handle, HOSPITALS)  # type: ignore[arg-type]
    try:
        run_federation(grid, settings)
    except Interrupted:
        pass
    return grid, _rows(run_dir)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _types(grid: InProcessGrid) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in grid.received:
        out[r.metadata.message_type] = out.get(r.metadata.message_type, 0) + 1
    return out


def _close(a: Any, b: Any, where: str = "") -> None:
    """Equal, floats to 1e-6: the thread count of a forward pass moves the last digits."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), where
        for key in a:
            _close(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def separate(tmp_path_factory: pytest.TempPathFactory, heart_bundle: Path,
             signing_key_path: Path) -> tuple[Path, InProcessGrid, list[dict[str, Any]]]:
    run_dir = tmp_path_factory.mktemp("separate") / "run"
    with task_identity():  # module scope: set up before the autouse fixture
        grid, rows = _run(run_dir, heart_bundle, signing_key_path)
    return run_dir, grid, rows


def test_one_message_per_node_per_round_publishes_the_same_versions(
        tmp_path: Path, heart_bundle: Path, signing_key_path: Path,
        separate: tuple[Path, InProcessGrid, list[dict[str, Any]]]) -> None:
    sep_dir, sep_grid, sep_rows = separate
    grid, rows = _run(tmp_path / "run", heart_bundle, signing_key_path, FOLD)
    rounds = 3
    # separate: evaluate messages at rounds 0..3; folded: only the last version's
    assert _types(sep_grid)["evaluate"] == HOSPITALS * (rounds + 1)
    assert _types(grid)["evaluate"] == HOSPITALS
    assert _types(grid)["train"] == _types(sep_grid)["train"] == HOSPITALS * rounds
    for r in grid.received:
        if r.metadata.message_type == "train":
            metrics = r.content.metric_records[rk.METRICS]
            assert "val-auc" in metrics and "test-auc" in metrics and "loss" in metrics
    assert [r["round"] for r in rows] == [r["round"] for r in sep_rows] == list(range(rounds + 1))
    for ours, theirs in zip(rows, sep_rows, strict=True):
        ours, theirs = dict(ours), dict(theirs)
        ours.pop("elapsed_s"), theirs.pop("elapsed_s")
        _close(ours, theirs, f"round {ours['round']}")
    run = tmp_path / "run"
    for name in ("best.json", "latest.json"):
        assert json.loads((run / "registry" / name).read_text())["version"] == \
            json.loads((sep_dir / "registry" / name).read_text())["version"]
    # FedAdam's moments are committed with the round they belong to
    ours_cp, theirs_cp = load_checkpoint(run), load_checkpoint(sep_dir)
    assert ours_cp is not None and theirs_cp is not None and ours_cp.round == theirs_cp.round == 3
    for attr, arrays in theirs_cp.state.items():
        for key, value in arrays.items():
            assert ours_cp.state[attr][key] == pytest.approx(value, rel=1e-6)


def test_a_resumed_fedadam_run_continues_the_uninterrupted_one(
        tmp_path: Path, heart_bundle: Path, signing_key_path: Path,
        separate: tuple[Path, InProcessGrid, list[dict[str, Any]]]) -> None:
    """Separate evaluation: killed in round 2, resumed; FedAdam's restored moments are
    bias-corrected by the federation's round, not by the resumed start's count."""
    run_dir = tmp_path / "run"

    _, rows = _run(run_dir, heart_bundle, signing_key_path, reply=_dies_in_round(2))
    assert [r["round"] for r in rows] == [0, 1]
    _, rows = _run(run_dir, heart_bundle, signing_key_path, resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for ours, theirs in zip(rows, separate[2], strict=True):
        ours, theirs = dict(ours), dict(theirs)
        ours.pop("elapsed_s"), theirs.pop("elapsed_s")
        _close(ours, theirs, f"round {ours['round']}")


def test_an_interrupted_run_commits_only_scored_versions_and_resumes(
        tmp_path: Path, heart_bundle: Path, signing_key_path: Path,
        separate: tuple[Path, InProcessGrid, list[dict[str, Any]]]) -> None:
    run_dir = tmp_path / "run"

    _, rows = _run(run_dir, heart_bundle, signing_key_path, FOLD, reply=_dies_in_round(3))
    # round 2 trained, but its scores were to come with round 3: not published, not committed
    assert [r["round"] for r in rows] == [0, 1]
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint.round == 1
    assert sorted(p.name for p in (run_dir / "registry").glob("v*")) == ["v0000", "v0001"]
    grid, rows = _run(run_dir, heart_bundle, signing_key_path, FOLD, resume=True)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert _types(grid)["train"] == HOSPITALS * 2  # rounds 2 and 3 again, nothing more
    for ours, theirs in zip(rows, separate[2], strict=True):
        ours, theirs = dict(ours), dict(theirs)
        ours.pop("elapsed_s"), theirs.pop("elapsed_s")
        _close(ours, theirs, f"round {ours['round']}")


def test_a_train_reply_claiming_more_validation_rows_than_declared_is_excluded(
        tmp_path: Path, heart_bundle: Path, signing_key_path: Path) -> None:
    def inflate(msg: Message, reply: Message) -> Message:
        if msg.metadata.message_type != "train" or msg.metadata.dst_node_id != FIRST_NODE:
            return reply
        metrics = dict(reply.content.metric_records[rk.METRICS])
        metrics["val-n"] = 10_000
        content = RecordDict(dict(reply.content.items()))
        content[rk.METRICS] = MetricRecord(metrics)  # type: ignore[arg-type]
        return Message(content, reply_to=msg)

    _, rows = _run(tmp_path / "run", heart_bundle, signing_key_path, FOLD, reply=inflate)
    liar = next(iter(rows[1]["excluded"]))
    assert "'val-n' is above the" in rows[1]["excluded"][liar]
    # its scores of version 0 came with the excluded reply: version 0 is checked without them
    assert liar not in rows[0]["sites"] and len(rows[0]["sites"]) == HOSPITALS - 1
    assert liar not in rows[1]["train"]


def test_evaluate_with_train_refuses_secure_aggregation() -> None:
    with pytest.raises(ConfigError, match="evaluate_with_train.*secure_aggregation"):
        load_config(HEART, [FOLD, "federation.privacy.secure_aggregation=true"])


@pytest.mark.parametrize("fold", [False, True], ids=["separate", "evaluate_with_train"])
def test_the_overhead_benchmark_spans_exactly_the_training_rounds_it_divides_by(
        tmp_path: Path, heart_bundle: Path, signing_key_path: Path, fold: bool) -> None:
    """benchmarks/overhead.py reads a run's per-round CPU between metrics.jsonl lines. With
    one message per node, version r's line waits for round r + 1's training and the last
    line for an evaluation-only exchange: the span must still hold exactly its rounds of
    training. Here the 'CPU' at each line is the training rounds done when it appeared."""
    from benchmarks.overhead import FOLD as BENCH_FOLD
    from benchmarks.overhead import _rounds_of
    from benchmarks.util import CmdResult

    run_dir = tmp_path / "run"
    trained, at_line = [0], []

    def count(msg: Message, reply: Message) -> Message:
        # lines are written by the server between exchanges: record them before this one
        at_line.extend([trained[0] / HOSPITALS] * (len(_rows(run_dir)) - len(at_line)))
        trained[0] += msg.metadata.message_type == "train"
        return reply

    _run(run_dir, heart_bundle, signing_key_path, *([FOLD] if fold else []), reply=count)
    at_line.extend([trained[0] / HOSPITALS] * (len(_rows(run_dir)) - len(at_line)))
    assert BENCH_FOLD == FOLD and len(at_line) == 4  # versions 0..3
    result = CmdResult(0, 1.0, 0, 1.0, tuple(at_line))
    figures = _rounds_of(result, run_dir / "metrics.jsonl", lag=1 if fold else 0)
    assert figures["per_round_cpu_s"] == pytest.approx(1.0)  # rounds 2 and 3: 2 rounds / 2
