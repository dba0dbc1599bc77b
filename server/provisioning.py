"""A Grid wrapper that gives each node the backbone once, checks every reply, counts bytes.

Every strategy talks to nodes through `grid.send_and_receive`, so wrapping the Grid works for
all of Flower's strategies without copying their round loop. Before a node's first message in
this run, the server asks it whether its cache holds the backbone (by sha256) and sends the
backbone file only if not. A node whose cache lost the backbone later replies with an error
starting with ``backbone-missing``; it is provisioned again and its message resent once.

Every reply is checked (`server/validation.py`) before anything uses it; a bad one is
excluded, logged with the hospital's name and recorded in `audit.jsonl`. The strategy only
ever sees checked replies, with the aggregation weight the server allows and the same metric
keys from every site (Flower stops a run on inconsistent replies). Hospitals are named by
their enrolment (deployment: the name registered for the node key) or, failing that, by the
name they report, sanitised and made unique.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common import records as rk
from common.config import ValidationConfig
from common.names import printable, sanitise_name
from server.delegating_grid import DelegatingGrid, send_and_receive
from server.validation import (
    check_evaluate_reply,
    check_provision_reply,
    check_score_counts,
    is_count,
    validate_train_replies,
    weight_bound,
)

log = logging.getLogger("medfed.server")
ENROLMENT_FILE = "enrolment.json"
TRAIN_KEYS = (rk.NUM_EXAMPLES, "loss", "steps")  # what the strategy sees of a train reply


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. too few valid updates); the message says why."""


@dataclass(frozen=True)
class Enrolment:
    """What the operator says about the hospitals: names by node id, sizes by name."""

    names: dict[int, str] = field(default_factory=dict)  # node id -> registered name
    max_examples: dict[str, int] = field(default_factory=dict)  # name -> enrolled train rows

    @classmethod
    def load(cls, run_dir: Path) -> Enrolment:
        """`<run_dir>/enrolment.json`, written by `medfed server` / `medfed simulate`."""
        path = Path(run_dir) / ENROLMENT_FILE
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text(encoding="utf-8"))
        names = {int(k): sanitise_name(v) for k, v in raw.get("names", {}).items()}
        sizes = {sanitise_name(k): int(v) for k, v in raw.get("max_examples", {}).items()
                 if is_count(v)}
        return cls(names, sizes)

    def write(self, run_dir: Path) -> None:
        """Record it for the ServerApp (atomic)."""
        from common.atomic import atomic_write_text  # noqa: PLC0415

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(run_dir) / ENROLMENT_FILE, json.dumps(
            {"names": {str(k): v for k, v in self.names.items()},
             "max_examples": self.max_examples}, indent=2, sort_keys=True) + "\n")


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


def _with_metrics(reply: Message, metrics: dict[str, float],
                  order: list[str] | None = None) -> Message:
    """A shallow copy of `reply` for the strategy: its arrays (in the `order` of the tensors
    sent, when given), and exactly these metrics.

    The original stays untouched (our own per-site metrics read it). The order matters:
    Flower's server-side DP clipping pairs a reply's tensors with the global ones by
    position, while FedAvg averages by name, so a reply with its tensors reversed escaped
    the clipping (one update of norm 0.01 moved the aggregate by 122 at clipping norm 1).
    """
    out = copy.copy(reply)
    arrays = reply.content.array_records.get(rk.ARRAYS)  # the update (train replies only)
    if arrays is not None and order is not None:
        arrays = ArrayRecord({name: arrays[name] for name in order})
    out.content = RecordDict({**({rk.ARRAYS: arrays} if arrays is not None else {}),
                              rk.METRICS: MetricRecord(metrics)})  # type: ignore[arg-type]
    return out


AUDIT_ITEMS = 16  # values of a list a reply carries that the audit keeps (then a count)


def _audited(value: object) -> object:
    """A reply's value as the audit keeps it: what it was, bounded (recorded before the
    reply is checked, and shown by the console): text printable and capped, bytes by their
    length, a list's first items and its length."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list):
        head = [_audited(v) for v in value[:AUDIT_ITEMS]]
        return head if len(value) <= AUDIT_ITEMS else [*head, f"… {len(value)} items"]
    return value


def _attribute_errors(messages: list[Message], replies: list[Message]) -> None:
    """An error the SuperLink writes itself ("Node Unavailable") comes from the SuperLink's
    node id, not the hospital's: give it the id of the node the message went to, so every
    log line and record names that hospital."""
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages
              if m.metadata.message_id}
    for reply in replies:
        node = dst_of.get(reply.metadata.reply_to_message_id)
        if node is not None and reply.has_error() and reply.metadata.src_node_id != node:
            # Flower's Metadata has no setter; its fields live in __dict__ (flwr 1.42)
            reply.metadata.__dict__["_src_node_id"] = node


def _round_of(messages: list[Message]) -> int | None:
    """The federation round a batch of our messages belongs to (their config says; a
    resumed run adds the rounds done before), None for messages outside the rounds."""
    for msg in messages[:1]:
        for record in msg.content.config_records.values():
            rnd = record.get(rk.SERVER_ROUND)
            if isinstance(rnd, int) and not isinstance(rnd, bool):
                offset = record.get(rk.ROUND_OFFSET, 0)
                return rnd + (offset if isinstance(offset, int) else 0)
    return None


@dataclass
class ProvisioningGrid(DelegatingGrid):
    """Delegates to Flower's Grid; adds provisioning, reply checks, traffic counts, audit."""

    inner: Grid
    payload: BackbonePayload
    timeout: float = 600.0  # per round (the strategy's timeout wins when it passes one)
    provision_timeout: float = 600.0  # first contact can include a node's slow start-up
    provisioned: set[int] = field(default_factory=set)
    traffic: dict[int, NodeTraffic] = field(default_factory=dict)
    site_names: dict[int, str] = field(default_factory=dict)
    last_replies: dict[str, list[Message]] = field(default_factory=dict)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    declared: dict[int, float] = field(default_factory=dict)  # node -> training rows declared
    split_sizes: dict[int, dict[str, int]] = field(default_factory=dict)  # node -> rows/split
    excluded: dict[str, str] = field(default_factory=dict)  # site -> reason, this round
    audit_path: Path | None = None  # one JSON line per reply: what each site sent
    enrolment: Enrolment = field(default_factory=Enrolment)
    gone: set[int] = field(default_factory=set)  # hospitals that left (data refused)

    # --- names ----------------------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """Online nodes. One that left (data refused) and went offline since gets a fresh
        look when it comes back: its hospital may have fixed the file."""
        live = list(self.inner.get_node_ids())
        self.gone &= set(live)
        return self.in_site_order(live)

    def in_site_order(self, nodes: Iterable[int]) -> list[int]:
        """`nodes` by hospital name, then node id.

        Flower draws node ids at random each run and hands replies over as they arrive, so
        neither order repeats. In this one, the same config and seed sample the same
        hospitals (Flower's strategies draw from this list) and sum their updates in the same
        order (a float sum depends on it): a run can be repeated, version for version.
        """
        return sorted(nodes, key=self._site_key)

    def _site_key(self, node: int) -> tuple[str, int]:
        return self.site(node), node

    def _by_site(self, replies: list[Message]) -> list[Message]:
        """`replies` in :meth:`in_site_order` of their senders."""
        return sorted(replies, key=lambda r: self._site_key(r.metadata.src_node_id))

    def site(self, node: int) -> str:
        """The hospital's name: enrolled, else reported (unique), else `node-<id>`."""
        if node in self.enrolment.names:
            return self.enrolment.names[node]
        return self.site_names.get(node, f"node-{node}")

    def _learn_name(self, node: int, reported: object) -> None:
        if node in self.enrolment.names or node in self.site_names:
            return
        name = sanitise_name(reported)
        taken = set(self.site_names.values()) | set(self.enrolment.names.values())
        if name in taken:
            unique = f"{name}~{node % 100000}"
            log.warning("two hospitals call themselves %s: node %d goes by %s", name, node,
                        unique)
            name = unique
        self.site_names[node] = name

    # --- audit and traffic ----------------------------------------------------------------
    def _count_out(self, messages: list[Message]) -> None:
        for msg in messages:
            t = self.traffic.setdefault(msg.metadata.dst_node_id, NodeTraffic())
            t.bytes_sent += content_bytes(msg.content)
            t.messages += 1

    def _write_audit(self, entries: list[dict[str, object]]) -> None:
        if self.audit_path is None or not entries:
            return
        self.audit_path.parent.mkdir(parents=True, exist_ok=True)
        with self.audit_path.open("a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(e, default=str) + "\n" for e in entries))

    def _audit(self, replies: list[Message], server_round: int | None) -> None:
        """Record the shape of everything each site sent (names, shapes, scalars, errors),
        with the site's name and the federation round (None: provisioning, delivery)."""
        lines = []
        for msg in replies:
            entry: dict[str, object] = {
                "time": round(time.time(), 3), "node": msg.metadata.src_node_id,
                "site": self.site(msg.metadata.src_node_id), "round": server_round,
                "type": msg.metadata.message_type,
            }
            if msg.has_error():
                # the hospital's words: bounded and printable here too (the console shows
                # them; 20 MB or a right-to-left override went into the page before)
                entry["error"] = printable(msg.error.reason)
            else:
                entry["arrays"] = {
                    f"{key}/{name}": {"shape": list(arr.shape), "dtype": arr.dtype}
                    for key, rec in msg.content.array_records.items() for name, arr in rec.items()
                }
                entry["metrics"] = {
                    printable(f"{key}/{name}"): _audited(value)
                    for key, rec in msg.content.metric_records.items()
                    for name, value in rec.items()
                }
                entry["configs"] = {
                    printable(f"{key}/{name}"): _audited(value)
                    for key, rec in msg.content.config_records.items()
                    for name, value in rec.items()
                }
            lines.append(entry)
        self._write_audit(lines)

    def _left(self, node: int, reason: str) -> None:
        """A hospital whose data does not match the model: said once, by name."""
        if node in self.gone:
            return
        self.gone.add(node)
        detail = reason.split(f"{rk.DATA_REFUSED}: ", 1)[-1]
        # Flower wraps a ClientApp's exception as "<class '...'>:<'message'>"
        detail = printable(detail.removesuffix("'>"))
        log.warning("%s left: its data does not match the model's schema (%s)",
                    self.site(node), detail)
        self.excluded[self.site(node)] = f"left: {detail}"

    def exclude(self, node: int, reason: str, message_type: str = "") -> None:
        """Record an excluded reply: the log, `metrics.jsonl` (`excluded`), `audit.jsonl`."""
        site = self.site(node)
        self.excluded[site] = reason
        log.warning("excluded the %sreply of %s: %s",
                    f"{message_type} " if message_type else "", site, reason)
        self._write_audit([{"time": round(time.time(), 3), "node": node, "site": site,
                            "type": message_type, "excluded": reason}])

    def _count_in(self, replies: list[Message], server_round: int | None) -> None:
        for msg in replies:
            node = msg.metadata.src_node_id
            t = self.traffic.setdefault(node, NodeTraffic())
            if msg.has_error():
                reason = str(msg.error.reason or "")
                if rk.DATA_REFUSED in reason:
                    self._left(node, reason)
                else:
                    log.warning("%s replied with an error: %s", self.site(node),
                                printable(reason))
                continue
            self.gone.discard(node)  # back with data that fits: a later refusal is news
            t.bytes_received += content_bytes(msg.content)
            site = msg.content.config_records.get(rk.SITE)
            if site is not None and rk.SITE_NAME in site:
                self._learn_name(node, site[rk.SITE_NAME])
        self._audit(replies, server_round)  # after: a name given in this reply is used

    def _exchange(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        # a hospital that left still counts as available for Flower, but gets nothing more
        messages = [m for m in messages if m.metadata.dst_node_id not in self.gone]
        if not messages:
            return []
        self._count_out(messages)
        wait = self.timeout if timeout is None else timeout
        replies = send_and_receive(self.inner, messages, wait)
        _attribute_errors(messages, replies)
        self._count_in(replies, _round_of(messages))
        return self._by_site(replies)  # after _count_in: a first reply names its site

    # --- provisioning ---------------------------------------------------------------------
    def _declare(self, node: int, metrics: MetricRecord) -> None:
        rows = metrics.get(rk.NUM_TRAIN)
        if isinstance(rows, int | float) and math.isfinite(rows) and rows > 0:
            self.declared[node] = float(rows)
        sizes = {split: int(float(metrics[f"rows/{split}"]))  # type: ignore[arg-type]
                 for split in ("train", "validation", "test")
                 if is_count(metrics.get(f"rows/{split}"))}
        if len(sizes) == 3 and sizes != self.split_sizes.get(node):
            self.split_sizes[node] = sizes
            log.info("%s: %d train, %d validation, %d test rows", self.site(node),
                     sizes["train"], sizes["validation"], sizes["test"])

    def bounded_declared(self) -> dict[int, float]:
        """Declared training rows, capped by the enrolled size or the configured cap."""
        out = {}
        for node, rows in self.declared.items():
            cap = self.enrolment.max_examples.get(self.site(node)) or \
                self.validation.max_examples or rows
            out[node] = min(rows, float(cap))
        return out

    def _checked_provision(self, replies: list[Message]) -> list[Message]:
        good = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                if rk.DATA_REFUSED not in str(reply.error.reason or ""):
                    log.warning("%s could not check its backbone cache: %s", self.site(node),
                                printable(reply.error.reason))
                continue
            problem = check_provision_reply(reply)
            if problem is not None:
                self.exclude(node, problem, reply.metadata.message_type)
                continue
            good.append(reply)
        return good

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
        for reply in self._checked_provision(self._exchange(asks, self.provision_timeout)):
            node = reply.metadata.src_node_id
            metrics = reply.content.metric_records[rk.METRICS]
            self._declare(node, metrics)
            if metrics.get(rk.HAS_BACKBONE) == 1 and not force:
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
        replies = self._exchange(sends, self.provision_timeout)
        for reply in replies:
            t = self.traffic.setdefault(reply.metadata.src_node_id, NodeTraffic())
            t.backbone_sends += 1
            t.backbone_bytes += len(self.payload.file_bytes)
        for reply in self._checked_provision(replies):
            node = reply.metadata.src_node_id
            self.provisioned.add(node)
            self._declare(node, reply.content.metric_records[rk.METRICS])
            log.info("backbone sent to %s (%d bytes)", self.site(node),
                     len(self.payload.file_bytes))

    # --- every message --------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Provision new nodes, send, check the replies; resend once after a lost backbone.

        Train and evaluate replies come back as checked copies: what the strategy may use.
        The originals of good replies are kept in `last_replies` for our own metrics.
        """
        messages = list(messages)
        needs_backbone = [m for m in messages if not m.metadata.message_type.startswith("query.")]
        self.provision({m.metadata.dst_node_id for m in needs_backbone})
        replies = self._exchange(messages, timeout)
        lost = {
            r.metadata.src_node_id for r in replies
            if r.has_error() and rk.MISSING_BACKBONE in (r.error.reason or "")
        }
        if lost:
            log.warning("%s lost the backbone; sending it again",
                        ", ".join(self.site(n) for n in sorted(lost)))
            self.provision(lost, force=True)
            retry = [
                Message(m.content, dst_node_id=m.metadata.dst_node_id,
                        message_type=m.metadata.message_type)
                for m in messages if m.metadata.dst_node_id in lost
            ]
            replies = [r for r in replies if r.metadata.src_node_id not in lost]
            replies = self._by_site(replies + self._exchange(retry, timeout))
        kind = messages[0].metadata.message_type if messages else ""
        if kind == "train":
            originals, replies = self._validated(messages, replies, timeout)
            self._bound_score_rows(originals, evaluate=False)
        elif kind == "evaluate":
            originals = self._bound_score_rows(self._checked_evaluate(replies), evaluate=True)
            replies = [r if r.has_error() else _with_metrics(r, {
                rk.NUM_EXAMPLES: float(r.content.metric_records[rk.METRICS][rk.NUM_EXAMPLES])})  # type: ignore[arg-type]
                for r in originals]
        else:
            originals = replies
        if messages:
            self.last_replies[kind] = originals
        return replies

    def _bound_score_rows(self, replies: list[Message], evaluate: bool) -> list[Message]:
        """Cap the rows each site says it scored (`val-n`, `test-n`): they weigh its scores in
        the mean over sites, so a site claiming a huge split would set the validation figure,
        and with it `best`, alone. The bound is the one on training weights
        (:func:`weight_bound`: the enrolled size, else the cap, else a multiple of the
        median claim). Rewrites the metrics of the (checked) replies in place; `evaluate`:
        an evaluate reply, whose `num-examples` are its validation rows too."""
        v = self.validation
        for prefix, weight_key in (("val-", rk.NUM_EXAMPLES if evaluate else None),
                                   ("test-", None)):
            claimed = {r.metadata.src_node_id: float(r.content.metric_records[rk.METRICS][  # type: ignore[arg-type]
                f"{prefix}n"]) for r in replies if not r.has_error()
                and f"{prefix}n" in r.content.metric_records[rk.METRICS]}
            enrolled = {n: self.enrolment.max_examples.get(self.site(n)) for n in claimed}
            bounds = weight_bound(claimed, enrolled, v.max_examples, v.max_examples_ratio)
            for reply in replies:
                node = reply.metadata.src_node_id
                if node not in claimed or claimed[node] <= bounds[node]:
                    continue
                bound = float(math.floor(bounds[node]))
                log.warning("capped the %s weight of %s: it claimed %.3g rows, the bound is "
                            "%.3g", "validation" if prefix == "val-" else "test",
                            self.site(node), claimed[node], bound)
                metrics = dict(reply.content.metric_records[rk.METRICS])
                metrics[f"{prefix}n"] = bound
                if f"{prefix}positives" in metrics:
                    metrics[f"{prefix}positives"] = min(float(metrics[f"{prefix}positives"]),  # type: ignore[arg-type]
                                                        bound)
                if weight_key is not None and weight_key in metrics:
                    metrics[weight_key] = bound
                reply.content.metric_records[rk.METRICS] = MetricRecord(metrics)  # type: ignore[arg-type]
        return replies

    def _checked_evaluate(self, replies: list[Message]) -> list[Message]:
        good = []
        for reply in replies:
            if not reply.has_error():
                node = reply.metadata.src_node_id
                problem = check_evaluate_reply(reply, self.split_sizes.get(node))
                if problem is not None:
                    self.exclude(node, problem, "evaluate")
                    continue
            good.append(reply)
        return good

    def _valid_only(self, messages: list[Message], replies: list[Message]
                    ) -> tuple[list[Message], list[Message]]:
        """(good originals, their checked copies with bounded weights)."""
        sent = {n: a.numpy() for n, a in messages[0].content.array_records[rk.ARRAYS].items()}
        ok = [r for r in replies if not r.has_error()]
        v = self.validation
        enrolled = {r.metadata.src_node_id: self.enrolment.max_examples.get(
            self.site(r.metadata.src_node_id)) for r in ok}
        verdicts = {x.node_id: x for x in validate_train_replies(
            sent, ok, self.declared, v.max_norm_ratio, v.max_update_norm, enrolled,
            v.max_examples, v.max_examples_ratio, TRAIN_KEYS)}
        originals, copies = [], []
        for reply in replies:
            if reply.has_error():
                originals.append(reply)
                copies.append(reply)
                continue
            node = reply.metadata.src_node_id
            verdict = verdicts[node]
            metrics = reply.content.metric_records[rk.METRICS]
            reason = verdict.reason if not verdict.valid else \
                check_score_counts(metrics, self.split_sizes.get(node))
            if reason is not None:
                self.exclude(node, str(reason), "train")
                continue
            claimed = float(metrics[rk.NUM_EXAMPLES])  # type: ignore[arg-type]
            assert verdict.weight is not None
            if verdict.weight < claimed:
                log.warning("capped the weight of %s: it claimed %.3g training rows, the "
                            "bound is %.3g", self.site(node), claimed, verdict.weight)
            kept = {k: float(metrics[k]) for k in TRAIN_KEYS}  # type: ignore[arg-type]
            kept[rk.NUM_EXAMPLES] = verdict.weight
            originals.append(reply)
            copies.append(_with_metrics(reply, kept, list(sent)))
        return originals, copies

    def _validated(self, messages: list[Message], replies: list[Message],
                   timeout: float | None) -> tuple[list[Message], list[Message]]:
        """Drop invalid updates; retry the round when too few valid ones remain, then stop."""
        self.excluded = {}
        originals, kept = self._valid_only(messages, replies)
        tries = 0
        need = self.validation.min_valid_replies
        while sum(1 for r in kept if not r.has_error()) < need:
            if tries >= self.validation.max_round_retries:
                config = messages[0].content.config_records[rk.CONFIG]
                server_round = int(config.get(rk.SERVER_ROUND, 0))  # type: ignore[arg-type]
                server_round += int(config.get(rk.ROUND_OFFSET, 0))  # type: ignore[arg-type]
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
            originals, kept = self._valid_only(messages, self._exchange(retry, timeout))
        return originals, kept
