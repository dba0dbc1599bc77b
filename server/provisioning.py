"""A Grid wrapper that gives each node the backbone once, counts bytes and records replies.

Every strategy talks to nodes through `grid.send_and_receive`, so wrapping the Grid works for
all of Flower's strategies without copying their round loop. Before a node's first message in
this run, the server asks it whether its cache holds the backbone (by sha256) and sends the
backbone file only if not. A node whose cache lost the backbone later replies with an error
starting with ``backbone-missing``; it is provisioned again and its message resent once.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import records as rk
from common.config import ValidationConfig
from server.delegating_grid import DelegatingGrid
from server.validation import validate_train_replies

log = logging.getLogger("medfed.server")


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. too few valid updates); the message says why."""


@dataclass(frozen=True)
class BackbonePayload:
    """What a node needs to hold the backbone: the file's bytes and the signed manifest."""

    sha256: str
    file_bytes: bytes
    manifest_json: str
    manifest_sig: str  # hex Ed25519 signature of manifest_json

    def meta(self) -> ConfigRecord:
        """The small part (sent in every provisioning query)."""
        return ConfigRecord({
            rk.BACKBONE_SHA256: self.sha256,
            rk.MANIFEST_JSON: self.manifest_json,
            rk.MANIFEST_SIG: self.manifest_sig,
        })

    def arrays(self) -> ArrayRecord:
        """The backbone file as one uint8 array (exact bytes, so the hash can be checked)."""
        data = np.frombuffer(self.file_bytes, dtype=np.uint8)
        return ArrayRecord({rk.BACKBONE_FILE: Array(data)})


@dataclass
class NodeTraffic:
    """Bytes and backbone sends for one node during this run."""

    backbone_sends: int = 0
    backbone_bytes: int = 0
    bytes_sent: int = 0  # array bytes in all messages to the node (backbone included)
    bytes_received: int = 0  # array bytes in the node's replies
    messages: int = 0


def content_bytes(content: RecordDict) -> int:
    """Array bytes carried by a message's content."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


@dataclass
class ProvisioningGrid(DelegatingGrid):
    """Delegates to Flower's Grid; adds backbone provisioning, traffic counts, reply capture."""

    inner: Grid
    payload: BackbonePayload
    timeout: float = 600.0  # per round (the strategy's timeout wins when it passes one)
    provision_timeout: float = 600.0  # first contact can include a node's slow start-up
    provisioned: set[int] = field(default_factory=set)
    traffic: dict[int, NodeTraffic] = field(default_factory=dict)
    site_names: dict[int, str] = field(default_factory=dict)
    last_replies: dict[str, list[Message]] = field(default_factory=dict)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    declared: dict[int, int] = field(default_factory=dict)  # node -> training rows declared
    split_sizes: dict[int, dict[str, int]] = field(default_factory=dict)  # node -> rows/split
    excluded: dict[str, str] = field(default_factory=dict)  # site -> reason, this round
    audit_path: Path | None = None  # one JSON line per reply: what each site sent


    # --- what medfed adds ---------------------------------------------------------------
    def _count_out(self, messages: list[Message]) -> None:
        for msg in messages:
            t = self.traffic.setdefault(msg.metadata.dst_node_id, NodeTraffic())
            t.bytes_sent += content_bytes(msg.content)
            t.messages += 1

    def site(self, node: int) -> str:
        """The site name a node reported, or `node-<id>` before it said."""
        return self.site_names.get(node, f"node-{node}")

    def _audit(self, replies: list[Message]) -> None:
        """Record the shape of everything each site sent (names, shapes, scalars, errors)."""
        if self.audit_path is None:
            return
        lines = []
        for msg in replies:
            entry: dict[str, object] = {
                "time": round(time.time(), 3), "node": msg.metadata.src_node_id,
                "type": msg.metadata.message_type,
            }
            if msg.has_error():
                entry["error"] = msg.error.reason
            else:
                entry["arrays"] = {
                    f"{key}/{name}": {"shape": list(arr.shape), "dtype": arr.dtype}
                    for key, rec in msg.content.array_records.items() for name, arr in rec.items()
                }
                entry["metrics"] = {
                    f"{key}/{name}": value
                    for key, rec in msg.content.metric_records.items()
                    for name, value in rec.items()
                }
                entry["configs"] = {
                    f"{key}/{name}": value
                    for key, rec in msg.content.config_records.items()
                    for name, value in rec.items()
                }
            lines.append(json.dumps(entry, default=str))
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))

    def _count_in(self, replies: list[Message]) -> None:
        self._audit(replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            t = self.traffic.setdefault(node, NodeTraffic())
            if msg.has_error():
                log.warning("node %d replied with an error: %s", node, msg.error.reason)
            else:
                t.bytes_received += content_bytes(msg.content)
                site = msg.content.config_records.get(rk.SITE)
                if site is not None and rk.SITE_NAME in site:
                    self.site_names[node] = str(site[rk.SITE_NAME])

    def _exchange(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        self._count_out(messages)
        wait = self.timeout if timeout is None else timeout
        replies = list(self.inner.send_and_receive(messages, timeout=wait))
        self._count_in(replies)
        return replies

    def _declare(self, node: int, metrics: MetricRecord) -> None:
        rows = metrics.get(rk.NUM_TRAIN)
        if isinstance(rows, int | float) and rows > 0:
            self.declared[node] = int(rows)
        sizes = {}
        for split in ("train", "validation", "test"):
            value = metrics.get(f"rows/{split}")
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and 0 <= value < 1e12:
                sizes[split] = int(value)
        if len(sizes) == 3 and sizes != self.split_sizes.get(node):
            self.split_sizes[node] = sizes
            log.info("%s: %d train, %d validation, %d test rows", self.site(node),
                     sizes["train"], sizes["validation"], sizes["test"])

    def provision(self, nodes: Iterable[int], force: bool = False) -> None:
        """Make sure each node holds the backbone; send the file only where it is missing."""
        todo = [n for n in nodes if force or n not in self.provisioned]
        if not todo:
            return
        asks = [
            Message(RecordDict({rk.BUNDLE_META: self.payload.meta()}), dst_node_id=n,
                    message_type=f"query.{rk.QUERY_BACKBONE}")
            for n in todo
        ]
        missing: list[int] = []
        for reply in self._exchange(asks, self.provision_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d could not check its backbone cache: %s", node,
                            reply.error.reason)
                continue
            metrics = reply.content.metric_records[rk.METRICS]
            has = metrics.get(rk.HAS_BACKBONE, 0)
            self._declare(node, metrics)
            if has and not force:
                self.provisioned.add(node)
            else:
                missing.append(node)
        if not missing:
            return
        sends = [
            Message(RecordDict({rk.BUNDLE_META: self.payload.meta(),
                                rk.BACKBONE_FILE: self.payload.arrays()}),
                    dst_node_id=n, message_type=f"query.{rk.QUERY_BACKBONE}")
            for n in missing
        ]
        for reply in self._exchange(sends, self.provision_timeout):
            node = reply.metadata.src_node_id
            t = self.traffic.setdefault(node, NodeTraffic())
            t.backbone_sends += 1
            t.backbone_bytes += len(self.payload.file_bytes)
            if reply.has_error():
                log.warning("node %d refused the backbone: %s", node, reply.error.reason)
                continue
            self.provisioned.add(node)
            self._declare(node, reply.content.metric_records[rk.METRICS])
            log.info("backbone sent to %s (%d bytes)", self.site(node), len(self.payload.file_bytes))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Provision new nodes, then send; resend once to nodes that lost the backbone."""
        messages = list(messages)
        needs_backbone = [m for m in messages if not m.metadata.message_type.startswith("query.")]
        self.provision({m.metadata.dst_node_id for m in needs_backbone})
        replies = self._exchange(messages, timeout)
        lost = {
            r.metadata.src_node_id for r in replies
            if r.has_error() and rk.MISSING_BACKBONE in (r.error.reason or "")
        }
        if lost:
            log.warning("nodes %s lost the backbone; sending it again", sorted(lost))
            self.provision(lost, force=True)
            retry = [
                Message(m.content, dst_node_id=m.metadata.dst_node_id,
                        message_type=m.metadata.message_type)
                for m in messages if m.metadata.dst_node_id in lost
            ]
            replies = [r for r in replies if r.metadata.src_node_id not in lost]
            replies += self._exchange(retry, timeout)
        if messages and messages[0].metadata.message_type == "train":
            replies = self._validated(messages, replies, timeout)
        if messages:
            self.last_replies[messages[0].metadata.message_type] = replies
        return replies

    def exclude(self, node: int, reason: str) -> None:
        """Record an excluded reply (logged, and in metrics.jsonl under `excluded`)."""
        self.excluded[self.site(node)] = reason
        log.warning("excluded the reply of %s: %s", self.site(node), reason)

    def _valid_only(self, messages: list[Message], replies: list[Message]) -> list[Message]:
        sent = {n: a.numpy() for n, a in messages[0].content.array_records[rk.ARRAYS].items()}
        ok = [r for r in replies if not r.has_error()]
        verdicts = validate_train_replies(sent, ok, self.declared,
                                          self.validation.max_norm_ratio)
        bad = {v.node_id: v.reason for v in verdicts if not v.valid}
        for node, reason in bad.items():
            self.excluded[self.site(node)] = str(reason)
            log.warning("excluded the update of %s: %s", self.site(node), reason)
        return [r for r in replies if r.metadata.src_node_id not in bad]

    def _validated(self, messages: list[Message], replies: list[Message],
                   timeout: float | None) -> list[Message]:
        """Drop invalid updates; retry the round when too few valid ones remain, then stop."""
        self.excluded = {}
        kept = self._valid_only(messages, replies)
        tries = 0
        need = self.validation.min_valid_replies
        while sum(1 for r in kept if not r.has_error()) < need:
            if tries >= self.validation.max_round_retries:
                server_round = messages[0].content.config_records[rk.CONFIG].get(rk.SERVER_ROUND)
                raise RunStopped(
                    f"round {server_round!s}:"
                    f" only {sum(1 for r in kept if not r.has_error())} valid updates, at least "
                    f"{need} needed (excluded: {self.excluded or 'none'}; failed replies: "
                    f"{sum(1 for r in kept if r.has_error())})")
            tries += 1
            log.warning("too few valid updates (%d < %d); retrying the round",
                        sum(1 for r in kept if not r.has_error()), need)
            retry = [Message(m.content, dst_node_id=m.metadata.dst_node_id,
                             message_type=m.metadata.message_type) for m in messages]
            kept = self._valid_only(messages, self._exchange(retry, timeout))
        return kept
