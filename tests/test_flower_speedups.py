"""The simulation engine's message loop (`server/flower_speedups.py`) delivers what Flower's
own loop delivers: same messages, same nodes, same order, one per node per tick.

Both loops run against Flower's real in-memory LinkState and InMemoryGrid, set up as
`flwr.simulation.run_simulation` sets them up (pre-registered run, registered nodes).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from queue import Empty, Queue
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid
from ray import cloudpickle

from client.client_app import ClientAppLoader
from common.settings import RunSettings
from server import flower_speedups
from tests.flower_helpers import RUN_ID, task_identity
from tests.limits import COMMAND_S, STOP_S

PRIMARY_TASK = 11
Loop = Callable[[Any, "Queue[Message]", dict[int, int], threading.Event], None]


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(node_id=SUPERLINK_NODE_ID, task_id=PRIMARY_TASK):  # as the ServerApp
        yield


def _federation(num_nodes: int) -> tuple[Any, InMemoryGrid, dict[int, int]]:
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=RUN_ID)
    run.primary_task_id = PRIMARY_TASK
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[PRIMARY_TASK] = Task(task_id=PRIMARY_TASK, run_id=run.run_id)
    mapping = vce_api._register_nodes(num_nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, mapping


def _push(grid: InMemoryGrid, mapping: dict[int, int], per_node: int) -> None:
    """`per_node` messages to each node, tagged with (partition, n), interleaved by node."""
    messages = [
        grid.create_message(RecordDict({"tag": ConfigRecord({"pid": pid, "n": n})}),
                            "train", node_id, "round")
        for n in range(per_node) for node_id, pid in mapping.items()]
    grid.push_messages(messages)


def _deliveries(loop: Loop, nodes: int, per_node: int) -> list[list[tuple[int, int]]]:
    """What `loop` puts in the queue, tick by tick (tags of the messages)."""
    state, grid, mapping = _federation(nodes)
    _push(grid, mapping, per_node)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(state, queue, mapping, stop), daemon=True)
    thread.start()
    seen: list[list[tuple[int, int]]] = []
    deadline = time.monotonic() + STOP_S
    while len(seen) < per_node and time.monotonic() < deadline:
        batch = []
        try:
            while len(batch) < nodes:  # a tick hands out at most one message per node
                msg = queue.get(timeout=STOP_S)
                tag = msg.content.config_records["tag"]
                batch.append((int(tag["pid"]), int(tag["n"])))  # type: ignore[arg-type]
        except Empty:
            break
        seen.append(sorted(batch))
    time.sleep(3 * flower_speedups.TICK_S)  # nothing more comes on later ticks
    seen += [[] for _ in range(queue.qsize())]
    stop.set()
    thread.join(timeout=STOP_S)
    return seen


def test_the_loop_delivers_what_flowers_loop_delivers() -> None:
    nodes, per_node = 6, 3
    ours = _deliveries(flower_speedups.add_messages_to_queue, nodes, per_node)
    theirs = _deliveries(vce_api.add_messages_to_queue, nodes, per_node)
    assert ours == theirs
    # one message per node per tick, oldest first, until each node has all of its own
    assert ours == [[(pid, n) for pid in range(nodes)] for n in range(per_node)]


def _run_loop(loop: Loop, state: Any, mapping: dict[int, int], want: int) -> list[Message]:
    """Run `loop` until it has queued `want` messages (or a few idle ticks more)."""
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(state, queue, mapping, stop), daemon=True)
    thread.start()
    got = []
    try:
        while len(got) < want:
            got.append(queue.get(timeout=STOP_S))
    except Empty:
        pass
    time.sleep(3 * flower_speedups.TICK_S)  # idle ticks: nothing more, nobody checked again
    stop.set()
    thread.join(timeout=STOP_S)
    return got + [queue.get_nowait() for _ in range(queue.qsize())]


def _counting_checks(monkeypatch, state: Any) -> list[set[str]]:
    checked: list[set[str]] = []
    original = state._check_stored_messages

    def counting(message_ids: set[str], run_id: int | None = None) -> None:
        checked.append(set(message_ids))
        original(message_ids, run_id)

    monkeypatch.setattr(state, "_check_stored_messages", counting)
    return checked


@pytest.mark.parametrize("loop", [flower_speedups.add_messages_to_queue,
                                  vce_api.add_messages_to_queue], ids=["ours", "flowers"])
def test_each_message_is_checked_once_not_once_per_node_before_it(monkeypatch, loop) -> None:
    """Flower's `get_message_ins(node, limit=1)` checks every stored message up to that node's:
    N^2 / 2 checks per exchange; ours checks each message it hands out, once."""
    nodes = 40
    state, grid, mapping = _federation(nodes)
    _push(grid, mapping, per_node=1)
    checked = _counting_checks(monkeypatch, state)
    got = _run_loop(loop, state, mapping, want=nodes)
    assert sorted(m.metadata.dst_node_id for m in got) == sorted(mapping)
    if loop is flower_speedups.add_messages_to_queue:
        assert len(checked) == nodes
        assert set().union(*checked) == {m.metadata.message_id for m in got}
    else:  # the cost removed, measured on Flower's own loop
        assert len(checked) >= nodes * (nodes + 1) // 2


@pytest.mark.parametrize("loop", [flower_speedups.add_messages_to_queue,
                                  vce_api.add_messages_to_queue], ids=["ours", "flowers"])
def test_an_expired_message_is_dropped_and_the_nodes_next_one_delivered(loop) -> None:
    state, grid, mapping = _federation(3)
    node = next(iter(mapping))
    stale = grid.create_message(RecordDict(), "train", node, "round", ttl=1.0)
    fresh = grid.create_message(RecordDict(), "train", node, "round")
    grid.push_messages([stale, fresh])
    assert stale.metadata.message_id and fresh.metadata.message_id
    time.sleep(1.2)  # the first one's TTL (1 s) has passed
    got = _run_loop(loop, state, mapping, want=1)
    assert [m.metadata.message_id for m in got] == [fresh.metadata.message_id]
    assert stale.metadata.message_id not in state.message_ins_store  # deleted, as Flower does


def test_install_replaces_flowers_loop_unless_told_not_to(monkeypatch) -> None:
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    monkeypatch.setenv("MEDFED_STOCK_FLOWER", "1")
    stock = vce_api.add_messages_to_queue
    assert flower_speedups.install() is False and vce_api.add_messages_to_queue is stock
    monkeypatch.delenv("MEDFED_STOCK_FLOWER")
    assert flower_speedups.install() is True
    assert vce_api.add_messages_to_queue is flower_speedups.add_messages_to_queue


def _settings(tmp_path: Path) -> RunSettings:
    return RunSettings(config_path=tmp_path / "c.yaml", overrides=("federation.rounds=2",),
                       run_dir=tmp_path / "run", bundle=None, keys=tmp_path / "k")


def _in_another_process(loader: ClientAppLoader) -> tuple[bool, bool]:
    """What an actor does with the loader it received: (a ClientApp, the same one twice)."""
    app = loader()
    return isinstance(app, ClientApp), loader() is app


def test_the_app_loader_travels_by_reference_and_builds_the_app_once(tmp_path) -> None:
    loader = ClientAppLoader(_settings(tmp_path))
    # Ray's own serialiser, as it sends the loader with every message: a few hundred bytes
    # (Flower's closure went by value, with the whole app)
    assert len(cloudpickle.dumps(loader)) < 1000
    assert isinstance(loader(), ClientApp)
    assert loader() is loader()  # one app per settings in a process
    other = ClientAppLoader(_settings(tmp_path / "other"))
    assert other() is not loader()
    # a fresh interpreter (spawn) rebuilds it from the settings alone
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rebuilt = pool.submit(_in_another_process, loader).result(timeout=COMMAND_S)
    assert rebuilt == (True, True)


def test_rays_backend_is_built_with_the_loader_not_flowers_closure(monkeypatch, tmp_path) -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend

    built: list[Any] = []
    monkeypatch.setattr(raybackend.RayBackend, "build",
                        lambda self, app_fn: built.append(app_fn))
    loader = ClientAppLoader(_settings(tmp_path))
    monkeypatch.setattr(vce_api, "add_messages_to_queue", vce_api.add_messages_to_queue)
    assert flower_speedups.install(loader) is True
    flower_speedups.install(loader)  # twice in one process: still one wrapper deep

    def flowers_closure() -> None:
        raise AssertionError("Flower's closure reached the backend")

    raybackend.RayBackend.build(object(), flowers_closure)
    assert built == [loader]
