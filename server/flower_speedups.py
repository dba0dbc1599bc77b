"""Two costs of Flower's simulation engine removed: an O(nodes x messages) scan per tick and
a by-value pickle of the ClientApp with every message.

flwr 1.42, `flwr/server/superlink/fleet/vce/vce_api.py::add_messages_to_queue`: every 0.1 s,
for every simulated node, it calls `InMemoryLinkState.get_message_ins(node_id, limit=1)`
(`flwr/server/superlink/linkstate/in_memory_linkstate.py`), which walks every stored message
and validates each one (TTL, federation membership) before it finds that node's. With N nodes
and M stored messages that is N x M checks ten times a second for the whole run, also while
the nodes are busy training: measured, it is most of the time of a 1000-hospital round
(benchmarks/RESULTS.md, section 3).

The replacement below asks the same state, with the same call, for the same nodes in the
same order, but only for nodes that have an undelivered message at that tick (one pass over
the store under its lock finds them). What is delivered, when, in which order, and what
Flower's own checks do to each message are unchanged; the calls skipped are the ones that
would have returned nothing. Installed by `server/simulate_worker.py` in the simulation
process only (`medfed simulate`); deployments do not use this engine. `MEDFED_STOCK_FLOWER=1`
leaves Flower's engine as it is (to measure the difference).

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
from collections.abc import Callable, Mapping
from queue import Queue
from typing import Any

FLOWER_FUNCTION = "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue"
FLOWER_BUILD = "flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend.build"
TICK_S = 0.1  # Flower's own polling interval


def pending_nodes(state: Any) -> set[int]:
    """Destination node ids of the messages in `state` not delivered yet (one pass)."""
    with state.lock:
        return {msg.metadata.dst_node_id for msg in list(state.message_ins_store.values())
                if msg.metadata.delivered_at == ""}


def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, Any],
                          f_stop: threading.Event) -> None:
    """Flower's loop, asking only for nodes that have something to receive."""
    while not f_stop.is_set():
        pending = pending_nodes(state)
        if pending:
            for node_id in nodes_mapping.keys():
                if node_id in pending:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
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

    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        raise _stale(FLOWER_FUNCTION)
    vce_api.add_messages_to_queue = add_messages_to_queue  # type: ignore[assignment]
    if app_loader is not None:
        use_app_loader(app_loader)
    return True
