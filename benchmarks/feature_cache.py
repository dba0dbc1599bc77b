"""Benchmark 5: a node's local round with and without the frozen-backbone feature cache.

The node is simulated hospital 0 of configs/breast.yaml (BreastMNIST over 5 hospitals,
Dirichlet 0.5) with the PneumoniaMNIST-pretrained CNN and the head training. A round is
`client.node.train` exactly as the ClientApp calls it: load the cached backbone, read the local
split, get the inputs (`Node.inputs`, which uses `client.cache.FeatureCache`), train the
configured local steps, return the head. "Without the cache" runs the same function with
`Node.inputs` replaced by one that returns the raw images, so every training step runs the
frozen backbone forward, as a node without the cache would. Median of several rounds each.
"""

from __future__ import annotations

import statistics
import time
from typing import Any
from unittest import mock

import numpy as np
import torch

from benchmarks import emulate
from benchmarks.util import ROOT, WORK, fmt, md_table
from client import node as ops
from client.cache import BackboneCache
from common.config_check import load_config
from common.data.federated import SiteSplit
from common.models import SplitModel, set_trainable, split_state
from common.settings import NodeSettings
from common.signing import public_key_path
from common.training import train_local
from server.federation import load_payload

CONFIG = ROOT / "configs" / "breast.yaml"


def _no_cache(self: ops.Node, model: SplitModel, site: SiteSplit, sha: str
              ) -> tuple[np.ndarray, bool]:
    return site.x_train, False


def _timed(fn: Any, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run(quick: bool) -> dict[str, Any]:
    """Median node-round times: cache cold (first round), warm, and no cache."""
    repeats = 3 if quick else 7
    torch.set_num_threads(1)  # as a Ray-simulated node; 2 threads on a busy machine thrash
    home = WORK / "home"
    # head only: the frozen backbone whose features the cache holds
    # the small CNN head of the recorded figures (configs/breast.yaml now holds a residual CNN)
    cfg = load_config(CONFIG, ["seed=0", "model.trainable=head", "federation.local.lr=0.01",
                               "model.family=cnn", "federation.local.augment=none",
                               "pretrain.optim.augment=none",
                               "federation.data.normalisation=site"])
    bundle = emulate.bundle_for(cfg, home / "bundles", home / "signing.key")
    payload = load_payload(bundle)
    workdir = WORK / "feature-cache" / "node-0000"
    settings = NodeSettings.from_node_config(
        {"partition-id": 0, "num-partitions": cfg.federation.data.num_sites,
         "workdir": str(workdir),
         "signing-pub": str(public_key_path(home / "signing.key"))}, None)  # type: ignore[arg-type]
    node = ops.Node(cfg, None, settings)  # type: ignore[arg-type]
    node.backbones.store(payload.sha256, payload.file_bytes, payload.manifest_json,
                         payload.manifest_sig)
    model, _ = emulate.start_model(cfg, bundle, home / "signing.key")
    names = set_trainable(model, cfg.model.trainable)
    head = {n: t for n, t in split_state(model)[1].items() if n in names}

    def round_() -> None:
        ops.train(node, head, payload.sha256, 1, 0.0)

    features = workdir / "features"
    cold = []
    for _ in range(repeats):  # first round of a run: features computed and stored
        for f in features.glob("*.npz"):
            f.unlink()
        cold += _timed(round_, 1)
    warm = _timed(round_, repeats)  # later rounds: cache hit
    with mock.patch.object(ops.Node, "train_inputs", _no_cache):
        plain = _timed(round_, repeats)
    site = node.site(node.backbones.load(payload.sha256)[1])
    feats, _ = node.train_inputs(model, site, payload.sha256)
    loop = {}  # the training loop alone, without the node's loading work
    for name, (x, cached) in {"cached": (feats, True), "uncached": (site.x_train, False)}.items():
        loop[name] = statistics.median(_timed(lambda x=x, cached=cached: train_local(
            model, x, site.y_train, cfg.federation.local, cfg.model.trainable,
            torch.device("cpu"), 0, features_cached=cached), repeats))
    out = {
        "site_train_images": int(len(site.y_train)), "local_steps": cfg.federation.local.steps,
        "batch_size": cfg.federation.local.batch_size, "torch_threads": torch.get_num_threads(),
        "repeats": repeats, "first_round_s": statistics.median(cold),
        "cached_round_s": statistics.median(warm), "uncached_round_s": statistics.median(plain),
        "backbone_cache_entries": len(list(BackboneCache(workdir / "backbones").root.iterdir())),
        "loop_cached_s": loop["cached"], "loop_uncached_s": loop["uncached"],
        "loop_speedup": loop["uncached"] / loop["cached"],
    }
    out["speedup"] = out["uncached_round_s"] / out["cached_round_s"]
    out["headline"] = {"feature_cache_speedup": out["speedup"]}
    print(f"  feature cache: {out['speedup']:.1f}x faster with the cache", flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    rows = [["no feature cache (backbone forward every step)",
             f"{res['uncached_round_s'] * 1000:.0f} ms", "1.0"],
            ["first round (features computed and cached)",
             f"{res['first_round_s'] * 1000:.0f} ms",
             fmt(res["uncached_round_s"] / res["first_round_s"], 1)],
            ["later rounds (cache hit)", f"{res['cached_round_s'] * 1000:.0f} ms",
             fmt(res["speedup"], 1)]]
    return "\n\n".join([
        f"Hospital 0 of BreastMNIST / 5 hospitals ({res['site_train_images']} train images), "
        f"CNN head training, {res['local_steps']} steps x batch {res['batch_size']}, "
        f"{res['torch_threads']} torch threads, median of {res['repeats']} node rounds "
        "(`client.node.train`, including backbone and data loading).",
        md_table(["local round", "time", "speed-up vs no cache"], rows),
        f"The training loop alone (`train_local`, no loading): "
        f"{res['loop_uncached_s'] * 1000:.0f} ms without vs {res['loop_cached_s'] * 1000:.1f} ms "
        f"with cached features ({fmt(res['loop_speedup'], 1)}x); the rest of a cached round is "
        "the node's fixed work (reading the backbone and its manifest, the site's data and the "
        "cache entry).",
    ])


