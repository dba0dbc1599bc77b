"""A Flower Grid that delivers messages to ClientApps in this process (no Ray, no SuperLink).

Lets a test run the real ServerApp code (`run_federation`, `run_secagg`) against the real
ClientApp in a few seconds, and see every message and reply. Needs
`tests.flower_helpers.task_identity` to be active (Flower's Message needs it outside Flower).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from common.settings import RunSettings
from tests.flower_helpers import RUN_ID

FIRST_NODE = 101  # node ids 101, 102, ...; partition-id = node id - FIRST_NODE


class InProcessGrid(Grid):
    """Calls `app` for each message with a per-node Context, like Flower's runtime.

    `received` keeps every reply the server got, in order (tests inspect it).
    """

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            FIRST_NODE + i: Context(run_id=RUN_ID, node_id=FIRST_NODE + i,
                                    node_config={"partition-id": i, "num-partitions": num_nodes},
                                    state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.received: list[Message] = []

    def set_run(self, run: Run) -> None:  # noqa: D102
        raise NotImplementedError

    @property
    def run(self) -> Run:  # noqa: D102
        return Run.create_empty(RUN_ID)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,  # noqa: D102
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Each message handled in turn; a handler's exception becomes an error reply."""
        replies = []
        for msg in messages:
            # a copy, as after transport: SecAgg+ shares one content object between messages
            # and its client mod pops keys from what it receives
            delivered = Message(copy.deepcopy(msg.content), dst_node_id=msg.metadata.dst_node_id,
                                message_type=msg.metadata.message_type,
                                group_id=msg.metadata.group_id)
            try:
                reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 (Flower's runtime does the same)
                # the reason as Flower's runtime writes it (flwr/supernode/runtime/run_clientapp.py)
                reason = str(type(err)) + ":<'" + str(err) + "'>"
                reply = Message(Error(code=0, reason=reason), reply_to=delivered)
            replies.append(reply)
        self.received += replies
        return replies


def server_context() -> Context:
    """The ServerApp's Context."""
    return Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config={})


def run_settings(config: Path, overrides: tuple[str, ...], run_dir: Path, bundle: Path,
                 keys: Path) -> RunSettings:
    """RunSettings as `medfed simulate` builds them."""
    return RunSettings(config_path=config, overrides=overrides, run_dir=run_dir, bundle=bundle,
                       keys=keys)
