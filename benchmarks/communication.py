"""Benchmark 4: what travels. Upload per client-round vs the raw trainable tensors, and how
often each node receives the backbone, from real `medfed simulate` runs.

medfed's `summary.json` counts, per node, the bytes of the arrays inside messages
(`ArrayRecord.count_bytes()`: each array's serialised NumPy bytes, including its header, plus
its key); message framing, metrics and TLS are not included. Wire-level bytes, as Flower's
SuperLink records them for a deployed run, are in the deployment benchmark.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks import emulate
from benchmarks.util import ROOT, WORK, bench_env, fmt, md_table, medfed, require_ok, run_cmd
from common.config_check import load_config
from common.manifest import model_from_manifest
from common.models import set_trainable

ROUNDS = 3
# the small CNN these rows measured (configs/breast.yaml now holds a residual CNN)
SMALL_CNN = ("model.family=cnn", "federation.local.augment=none", "pretrain.optim.augment=none",
             "federation.data.normalisation=site")
# (key, label, config, overrides)
CASES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("heart-mlp-head", "heart MLP, head", "heart.yaml", ()),
    ("breast-cnn-head", "BreastMNIST CNN, head", "breast.yaml",
     (*SMALL_CNN, "model.trainable=head")),
    ("breast-cnn-last1", "BreastMNIST CNN, head + last block", "breast.yaml",
     (*SMALL_CNN, "model.trainable=head+last-1")),
)


def raw_trainable(bundle: Path, trainable: str) -> tuple[int, int]:
    """(bytes, tensors) of the trainable tensors: numel x element size, nothing else."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    model = model_from_manifest(manifest)
    names = set(set_trainable(model, trainable))
    tensors = [t for n, t in model.state_dict().items() if n in names]
    return sum(t.numel() * t.element_size() for t in tensors), len(tensors)


def measure(key: str, config: str, extra: tuple[str, ...], home: Path) -> dict[str, Any]:
    """One `medfed simulate` run; per-node traffic from its summary.json."""
    path = ROOT / "configs" / config
    ovr = [*extra, f"federation.rounds={ROUNDS}", "seed=0"]
    cfg = load_config(path, ovr)
    bundle = emulate.bundle_for(cfg, home / "bundles", home / "signing.key")
    out = WORK / "communication" / key
    if out.exists():
        shutil.rmtree(out)
    log = WORK / "logs" / f"communication-{key}.log"
    res = run_cmd(medfed("simulate", "--config", str(path), *[a for o in ovr for a in ("--set", o)],
                         "--bundle", str(bundle), "--out", str(out)), bench_env(home), log)
    require_ok(res, log)
    traffic = json.loads((out / "summary.json").read_text(encoding="utf-8"))["traffic"]
    raw, tensors = raw_trainable(bundle, cfg.model.trainable)
    # replies that carry arrays are exactly the train replies (evaluate, backbone, adapt and
    # save-model replies hold metrics only), one per node and round
    uploads = [t["bytes_received"] / ROUNDS for t in traffic.values()]
    sends = [t["backbone_sends"] for t in traffic.values()]
    return {
        "key": key, "nodes": len(traffic), "rounds": ROUNDS, "trainable": cfg.model.trainable,
        "raw_trainable_bytes": raw, "trainable_tensors": tensors,
        "upload_bytes_per_client_round": max(uploads),
        "upload_ratio": max(uploads) / raw,
        "overhead_bytes_per_tensor": (max(uploads) - raw) / tensors,
        "backbone_bytes": max(t["backbone_bytes"] for t in traffic.values()),
        "backbone_sends_per_node": {"min": min(sends), "max": max(sends)},
        "download_bytes_per_node_run": max(t["bytes_sent"] for t in traffic.values()),
    }


def run(quick: bool) -> dict[str, Any]:
    """All cases, 3 rounds each (quick: the heart case only)."""
    home = WORK / "home"
    rows = []
    for key, label, config, extra in CASES[:1] if quick else CASES:
        rows.append({"label": label, **measure(key, config, extra, home)})
        print(f"  communication {key}: upload ratio {rows[-1]['upload_ratio']:.3f}", flush=True)
    worst = max(rows, key=lambda r: r["upload_ratio"])
    return {
        "rows": rows,
        "headline": {
            # the worst case: a fixed per-tensor header weighs most on the smallest payload
            "upload_bytes_ratio": worst["upload_ratio"],
            "backbone_sends_per_node": max(r["backbone_sends_per_node"]["max"] for r in rows),
        },
        "headline_note": f"upload_bytes_ratio is the worst case '{worst['key']}'",
    }


def markdown(res: dict[str, Any]) -> str:
    """Table for RESULTS.md."""
    table = [[r["label"], str(r["nodes"]), str(r["trainable_tensors"]),
              str(r["raw_trainable_bytes"]), f"{r['upload_bytes_per_client_round']:.0f}",
              fmt(r["upload_ratio"]), f"{r['overhead_bytes_per_tensor']:.0f}",
              str(r["backbone_bytes"]),
              f"{r['backbone_sends_per_node']['min']}–{r['backbone_sends_per_node']['max']}",
              str(r["download_bytes_per_node_run"])] for r in res["rows"]]
    return "\n\n".join([
        f"`medfed simulate`, {res['rows'][0]['rounds']} rounds, array payload bytes as counted "
        "by the server (`summary.json` → `traffic`).",
        md_table(["model, trainable", "nodes", "tensors", "raw trainable bytes",
                  "upload bytes / client-round", "ratio", "overhead bytes / tensor",
                  "backbone file bytes", "backbone sends / node / run",
                  "download bytes / node / run"], table),
    ])
