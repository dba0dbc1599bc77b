"""One loop of Flower's simulation engine, without its O(nodes x messages) cost per tick.

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
leaves Flower's loop as it is (to measure the difference).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from queue import Queue
from typing import Any

FLOWER_FUNCTION = "flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue"
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


def install() -> bool:
    """Use :func:`add_messages_to_queue` in Flower's simulation engine (this process);
    False when `MEDFED_STOCK_FLOWER=1` asks for Flower's own loop."""
    if os.environ.get("MEDFED_STOCK_FLOWER") == "1":
        return False
    from flwr.server.superlink.fleet.vce import vce_api

    if not callable(getattr(vce_api, "add_messages_to_queue", None)):
        raise RuntimeError(f"{FLOWER_FUNCTION} is gone: this Flower version is not the "
                           "one medfed was tested with")
    vce_api.add_messages_to_queue = add_messages_to_queue  # type: ignore[assignment]
    return True
