"""Two costs of Flower's simulation engine removed: O(nodes x messages) scans of its state and
a by-value pickle of the ClientApp with every message.

flwr 1.42, `flwr/server/superlink/fleet/vce/vce_api.py::add_messages_to_queue`: every 0.1 s,
for every simulated node, it calls `InMemoryLinkState.get_message_ins(node_id, limit=1)`
(`flwr/server/superlink/linkstate/in_memory_linkstate.py`), which walks every stored message
and validates each one (TTL, federation membership) before it finds that node's. With N nodes
and M stored messages that is N x M checks ten times a second for the whole run, also while
the nodes are busy training: measured, it is most of the time of a 1000-hospital round
(benchmarks/RESULTS.md, section 3).

The replacement below hands out what Flower's loop hands out at a tick: for each node, in the
same node order, its oldest undelivered message, after Flower's own check of that message
(`InMemoryLinkState._check_stored_messages`: TTL and federation membership; an invalid one
is deleted and the node's next one is tried), marked delivered as `get_message_ins` marks it.
It finds them in one pass over the store under the state's lock, instead of one pass per
node: Flower's `get_message_ins(node_id, limit=1)` walks and checks the store from the start
until it reaches that node's message, so even asking only the nodes that have one costs
N^2 / 2 checks per exchange (at 1000 nodes, 500,000 per round). Installed by
`server/simulate_worker.py` in the simulation process only (`medfed simulate`); deployments
do not use this engine. `MEDFED_STOCK_FLOWER=1` leaves Flower's engine as it is (to measure
the difference).

Second, `flwr/server/superlink/fleet/vce/backend/raybackend.py::RayBackend.process_message`
sends `self.app_fn` (set by `RayBackend.build`) to a Ray actor with each message. Flower's
`app_fn` is a closure (`vce_api.start_vce._load`) over the ClientApp object, so Ray's
cloudpickle serialises the closure and every handler of the app by value, scanning
`sys.modules` for each (`cloudpickle._find_imported_submodules`): measured with py-spy, 46%
of the simulation driver's CPU at 100 hospitals. `install(app_loader)` has `build` keep an
equivalent loader that pickles by reference instead (`client.client_app.ClientAppLoader`:
same settings, same app, built once per actor process).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from queue import Queue
from typing import Any

from flwr.supercore.date import now

FLOWER_FUNCTION = "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue"
FLOWER_BUILD = "flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend.build"
FLOWER_CHECK = ("flwr.server.superlink.linkstate.in_memory_linkstate.InMemoryLinkState."
                "_check_stored_messages")
TICK_S = 0.1  # Flower's own polling interval


def take_pending(state: Any, node_ids: Iterable[int]) -> list[Any]:
    """For each of `node_ids` (in that order) that has one, its oldest undelivered message in
    `state` that passes Flower's own check, marked delivered: what Flower's
    `get_message_ins(node_id, limit=1)` returns node by node, in one pass over the store."""
    with state.lock:
        waiting: dict[int, list[str]] = {}
        for msg_id, msg in list(state.message_ins_store.items()):
            if msg.metadata.delivered_at == "":
                waiting.setdefault(msg.metadata.dst_node_id, []).append(msg_id)
        if not waiting:
            return []
        taken = []
        for node_id in node_ids:
            for msg_id in waiting.get(node_id, ()):
                state._check_stored_messages({msg_id})  # deletes it if expired or foreign
                if (msg := state.message_ins_store.get(msg_id)) is not None:
                    taken.append(msg)
                    break
        delivered_at = now().isoformat()
        for msg in taken:
            msg.metadata.delivered_at = delivered_at
        return taken


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, Any],
                          f_stop: threading.Event) -> None:
    """Flower's loop: every tick, each node's next message into the queue."""
    while not f_stop.is_set():
        for msg in take_pending(state, nodes_mapping.keys()):
            queue.put(msg)
        f_stop.wait(TICK_S)


def _stale(name: str) -> RuntimeError:
    return RuntimeError(f"{name} is gone: this Flower version is not the one medfed was "
                        "tested with")


def use_app_loader(app_loader: Callable[[], Any]) -> None:
    """Have Flower's Ray backend send `app_loader` to its actors instead of its own closure."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = getattr(raybackend.RayBackend, "build", None)
    if not callable(original):
        raise _stale(FLOWER_BUILD)
    if getattr(original, "medfed_loader", None) is not None:
        original = original.__wrapped__  # installed before in this process: replace the loader

    @functools.wraps(original)
    def build(self: Any, app_fn: Callable[[], Any]) -> None:
        original(self, app_loader)

    build.medfed_loader = app_loader  # type: ignore[attr-defined]
    raybackend.RayBackend.build = build  # type: ignore[method-assign]


def install(app_loader: Callable[[], Any] | None = None) -> bool:
    """Use :func:`add_messages_to_queue` in Flower's simulation engine (this process) and,
    given `app_loader`, :func:`use_app_loader`; False when `MEDFED_STOCK_FLOWER=1` asks for
    Flower's own engine."""
    if os.environ.get("MEDFED_STOCK_FLOWER") == "1":
        return False
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        raise _stale(FLOWER_FUNCTION)
    if not callable(getattr(InMemoryLinkState, "_check_stored_messages", None)):
        raise _stale(FLOWER_CHECK)
    vce_api.add_messages_to_queue = add_messages_to_queue  # type: ignore[assignment]
    if app_loader is not None:
        use_app_loader(app_loader)
    return True
