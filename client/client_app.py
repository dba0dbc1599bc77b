"""Flower ClientApp of medfed: unpack a message, call `client/node.py`, pack the reply."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import node as ops
from client.dp_clipping import clip_when_asked
from client.events import emit
from client.secagg_client import handle_legacy, is_legacy, make_legacy_app
from common import records as rk
from common.personalise import SiteModel
from common.settings import NodeSettings, RunSettings


def _node(context: Context, defaults: RunSettings | None) -> ops.Node:
    run = defaults or RunSettings.from_run_config(context.run_config)
    return ops.Node(run.load_config(), run, NodeSettings.from_node_config(context.node_config, run))


def _site_record(name: str) -> ConfigRecord:
    return ConfigRecord({rk.SITE_NAME: name})


def site_model_metrics(result: SiteModel) -> dict[str, int | float | list[int] | list[float]]:
    """The site model's numbers: choice, operating point, validation and test metrics."""
    out: dict[str, int | float | list[int] | list[float]] = {
        rk.SITE_KEPT_ADAPTED: int(result.kept == "adapted"), "steps": result.steps,
        "temperature": result.op.temperature, "threshold": result.op.threshold,
    }
    for who in ("site_model", "global"):
        for split in ("validation", "test"):
            for key, value in ops.nan_for_none(result.report[who][split]).items():
                out[f"{who}/{split}/{key}"] = value
    out.update({f"rows/{k}": v for k, v in result.report["rows"].items()})
    return out


def site_model_record(result: SiteModel, hashes: dict[str, str]
                      ) -> dict[str, int | float | str | bytes | bool | list[int] | list[float]
                                | list[str] | list[bytes] | list[bool]]:
    """The site model's words: method, reason, threshold rule, notes, file hashes."""
    return {"method": result.method, "reason": result.reason, "rule": result.op.rule,
            "fitted-on": result.op.fitted_on or "", "notes": "\n".join(result.op.notes),
            **{f"sha256/{name}": digest for name, digest in hashes.items()}}


def _emit_scores(node: ops.Node, site: str, server_round: int, rows: int,
                 scores: dict[str, float]) -> None:
    """The hospital's log line for its validation of a global model."""
    emit(node.workdir, "evaluate", site=site, round=server_round, rows=rows,
         auc=scores.get("val-auc"), balanced_accuracy=scores.get("val-balanced_accuracy"))


Handler = Callable[[Message, Context], Message]


def _logged(kind: str, defaults: RunSettings | None) -> Callable[[Handler], Handler]:
    """A handler whose failure is also written to the hospital's own log, as a sentence."""
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except Exception as err:
                if isinstance(err, ops.DataRefused):
                    raise  # `medfed client` reports the refusal itself, once
                try:
                    workdir = _node(context, defaults).workdir
                except Exception:  # noqa: BLE001 - the settings themselves may be the error
                    workdir = None
                emit(workdir, "error", message=f"{kind} failed: {err}")
                raise
        return run
    return wrap


def _file_bytes(content: RecordDict, key: str) -> bytes | None:
    if key not in content.array_records:
        return None
    return np.ascontiguousarray(content.array_records[key][key].numpy()).tobytes()


def make_client_app(defaults: RunSettings | None = None) -> ClientApp:
    """A ClientApp; `defaults` (from `medfed simulate`) win over Flower's run config."""
    app = ClientApp()

    @app.query(rk.QUERY_BACKBONE)
    @_logged("receiving the backbone", defaults)
    def backbone(msg: Message, context: Context) -> Message:
        node = _node(context, defaults)
        meta = msg.content.config_records[rk.BUNDLE_META]
        sha = str(meta[rk.BACKBONE_SHA256])
        file_bytes = _file_bytes(msg.content, rk.BACKBONE_FILE)
        if file_bytes is not None:
            node.backbones.store(sha, file_bytes, str(meta[rk.MANIFEST_JSON]),
                                 str(meta[rk.MANIFEST_SIG]))
        has = node.backbones.has(sha)
        metrics: dict[str, int | float | list[int] | list[float]] = {rk.HAS_BACKBONE: int(has)}
        content: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
        if has:
            sizes, name = ops.declared_rows(node, sha)
            metrics[rk.NUM_TRAIN] = sizes["train"]
            metrics.update({f"rows/{k}": v for k, v in sizes.items()})
            content[rk.SITE] = _site_record(name)
            emit(node.workdir, "backbone", site=name, sha256=sha, received=file_bytes is not None,
                 **sizes)
        content[rk.METRICS] = MetricRecord(metrics)
        return Message(node.tampered("query.backbone", RecordDict(content)), reply_to=msg)

    legacy = make_legacy_app(lambda context: _node(context, defaults))  # SecAgg+ path

    @app.train(mods=[clip_when_asked])
    @_logged("training", defaults)
    def train(msg: Message, context: Context) -> Message:
        if is_legacy(msg):
            return handle_legacy(legacy, msg, context)
        node = _node(context, defaults)
        config = msg.content.config_records[rk.CONFIG]
        arrays = msg.content.array_records[rk.ARRAYS].to_torch_state_dict()
        server_round = int(config[rk.SERVER_ROUND]) + int(config.get(rk.ROUND_OFFSET, 0))  # type: ignore[arg-type]
        scores: dict[str, float] = {}
        if int(config.get(rk.EVALUATE_WITH_TRAIN, 0)):  # type: ignore[arg-type]
            # before training: the scores are the received global model's, not the update's
            scores, rows, site = ops.score_received(node, arrays, str(config[rk.BACKBONE_SHA256]),
                                                    "train message")
            _emit_scores(node, site, server_round - 1, rows, scores)  # the round before's model
        tensors, result, site = ops.train(
            node, arrays, str(config[rk.BACKBONE_SHA256]), server_round,
            float(config.get(rk.PROXIMAL_MU, 0.0)),  # type: ignore[arg-type]
        )
        metrics = MetricRecord({rk.NUM_EXAMPLES: result.num_examples, "loss": result.loss,
                                "steps": result.steps, **scores})
        emit(node.workdir, "train", site=site, round=server_round, rows=result.num_examples,
             steps=result.steps, loss=result.loss, device=result.device,
             threads=result.threads)
        return Message(node.tampered("train", RecordDict({
            rk.ARRAYS: ArrayRecord(tensors), rk.METRICS: metrics,
            rk.SITE: _site_record(site)})), reply_to=msg)

    @app.evaluate()
    @_logged("evaluating", defaults)
    def evaluate(msg: Message, context: Context) -> Message:
        if is_legacy(msg):
            return handle_legacy(legacy, msg, context)
        node = _node(context, defaults)
        config = msg.content.config_records[rk.CONFIG]
        arrays = msg.content.array_records[rk.ARRAYS].to_torch_state_dict()
        server_round = int(config.get(rk.SERVER_ROUND, 0))  # type: ignore[arg-type]
        server_round += int(config.get(rk.ROUND_OFFSET, 0))  # type: ignore[arg-type]
        metrics, n, site = ops.evaluate_local(node, arrays, str(config[rk.BACKBONE_SHA256]),
                                              server_round)
        _emit_scores(node, site, server_round, n, metrics)
        return Message(node.tampered("evaluate", RecordDict({
            rk.METRICS: MetricRecord({**metrics, rk.NUM_EXAMPLES: n}),
            rk.SITE: _site_record(site)})), reply_to=msg)

    @app.query(rk.QUERY_ADAPT)
    @_logged("building the site model", defaults)
    def adapt(msg: Message, context: Context) -> Message:
        node = _node(context, defaults)
        config = msg.content.config_records[rk.CONFIG]
        arrays = msg.content.array_records[rk.ARRAYS].to_torch_state_dict()
        result, hashes, site = ops.personalise_site(node, arrays, str(config[rk.BACKBONE_SHA256]))
        emit(node.workdir, "site-model", site=site, kept=result.kept, reason=result.reason,
             balanced_accuracy=result.report["site_model"]["validation"].get("balanced_accuracy"))
        return Message(RecordDict({
            rk.METRICS: MetricRecord(site_model_metrics(result)),
            rk.SITE_MODEL: ConfigRecord(site_model_record(result, hashes)),
            rk.SITE: _site_record(site)}), reply_to=msg)

    @app.query(rk.QUERY_SAVE_SITE_MODEL)
    @_logged("saving the site model", defaults)
    def save_site_model(msg: Message, context: Context) -> Message:
        node = _node(context, defaults)
        meta = msg.content.config_records[rk.BUNDLE_META]
        path = ops.save_site_model(node, str(meta[rk.MANIFEST_JSON]), str(meta[rk.MANIFEST_SIG]))
        emit(node.workdir, "site-model-saved", site=node.site_name(), path=str(path))
        return Message(RecordDict({rk.METRICS: MetricRecord({"saved": 1}),
                                   rk.SITE: _site_record(path.parent.name)}), reply_to=msg)

    @app.query(rk.QUERY_SAVE_MODEL)
    @_logged("receiving the model", defaults)
    def save_model(msg: Message, context: Context) -> Message:
        node = _node(context, defaults)
        meta = msg.content.config_records[rk.BUNDLE_META]
        head = _file_bytes(msg.content, rk.HEAD_FILE)
        if head is None:
            raise ValueError("save_model message carries no head file")
        path = ops.save_model(node, int(meta[rk.VERSION]), str(meta[rk.MANIFEST_JSON]),  # type: ignore[arg-type]
                              str(meta[rk.MANIFEST_SIG]), head,
                              _file_bytes(msg.content, rk.BACKBONE_FILE))
        saved = MetricRecord({"saved-version": int(path.name[1:])})
        emit(node.workdir, "model", site=node.site_name(), version=int(path.name[1:]),
             path=str(path))
        return Message(RecordDict({rk.METRICS: saved}), reply_to=msg)

    return app


@functools.lru_cache(maxsize=4)
def _app_for(defaults: RunSettings | None) -> ClientApp:
    return make_client_app(defaults)


@dataclass(frozen=True)
class ClientAppLoader:
    """What a simulation actor calls to get the ClientApp (`medfed simulate`).

    Flower's engine sends the app-loading callable with every message. Its own is a closure
    holding the app, which Ray cloudpickles by value each time (walking `sys.modules` for
    every closure of the app: ~6 ms of the driver's CPU per message, measured). This one is
    pickled by reference with the run settings (a few hundred bytes), and each actor process
    builds the app once per settings.
    """

    defaults: RunSettings | None = None

    def __call__(self) -> ClientApp:
        return _app_for(self.defaults)


# `flwr run .` entry point (see [tool.flwr.app.components] in pyproject.toml).
app = make_client_app()
