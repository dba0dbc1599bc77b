"""Benchmark 2: BreastMNIST transfer from a PneumoniaMNIST backbone.

The CNN of configs/breast.yaml is pretrained once on PneumoniaMNIST's train split (seed 0;
pretraining is the expensive part on a 2-core machine). BreastMNIST's train split is spread over
5 and 20 simulated hospitals with Dirichlet(0.5) label skew (each keeps 34% of its share as a
local test split, as `medfed simulate` does); every configuration is scored on the official
BreastMNIST test split (156 images) with test AUC and accuracy. Federated rows come from
:mod:`benchmarks.emulate` (the same functions as the Flower simulation).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from benchmarks import emulate
from benchmarks.util import ROOT, WORK, fmt, md_table, summary
from common.config import Config, load_config
from common.data.federated import load_federated
from common.device import resolve_device
from common.training import evaluate

CONFIG = ROOT / "configs" / "breast.yaml"
REFERENCE = {"auc": 0.901, "accuracy": 0.863}  # MedMNIST v2, ResNet-18 (28), centralised
HOSPITALS = (5, 20)
TUNED: tuple[str, ...] = ()  # applied to every row, on top of configs/breast.yaml
# (key, label, kind, overrides); kind: fed | fed+scratch | central
ROWS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("head", "FedAvg, head only", "fed", ("model.trainable=head",)),
    ("head+last-1", "FedAvg, head + last conv block", "fed",
     ("model.trainable=head+last-1", "federation.local.lr=0.002")),
    ("all", "FedAvg, full fine-tuning", "fed",
     ("model.trainable=all", "federation.local.lr=0.002")),
    ("scratch", "FedAvg, full model from scratch", "fed+scratch",
     ("model.trainable=all", "federation.local.lr=0.002")),
    ("central", "Centralised, full fine-tuning (pooled hospital train splits)", "central",
     ("model.trainable=all", "federation.local.lr=0.002")),
)


def row_config(extra: tuple[str, ...], hospitals: int, seed: int) -> Config:
    """configs/breast.yaml + TUNED + row overrides, `hospitals` sites, this seed."""
    return load_config(CONFIG, [*TUNED, *extra, f"federation.data.num_sites={hospitals}",
                                f"federation.strategy.min_nodes={hospitals}", f"seed={seed}"])


def one_run(key: str, kind: str, extra: tuple[str, ...], hospitals: int, seed: int,
            rounds: int | None) -> dict[str, Any]:
    """One row, one hospital count, one seed: held-out (official test split) metrics."""
    home = WORK / "home"
    cfg = row_config(extra, hospitals, seed)
    if rounds is not None:
        cfg = replace(cfg, federation=replace(cfg.federation, rounds=rounds))
    source = row_config(extra, hospitals, 0)  # the one pretrained backbone (seed 0)
    bundle = emulate.bundle_for(source, home / "bundles", home / "signing.key")
    model, norm = emulate.start_model(cfg, None if "scratch" in kind else bundle,
                                      home / "signing.key")
    data = load_federated(cfg.federation.data, norm, seed=cfg.seed)
    device = resolve_device(cfg.device)
    if kind == "central":
        budget = cfg.federation.rounds * cfg.federation.local.steps * hospitals
        x = np.concatenate([s.x_train for s in data.sites])
        y = np.concatenate([s.y_train for s in data.sites])
        trained = emulate.train_alone(cfg, model, x, y,
                                      replace(cfg.federation.local, steps=budget), cfg.seed)
        held = evaluate(trained, data.heldout_x, data.heldout_y, device)
    else:
        held = emulate.federate(cfg, model, data)["heldout"]
    return {"auc": held["auc"], "accuracy": held["accuracy"],
            "train_rows": int(sum(len(s.y_train) for s in data.sites))}


def run(quick: bool) -> dict[str, Any]:
    """Every row for 5 and 20 hospitals; 3 seeds (1 and 3 rounds fewer in quick mode)."""
    seeds = [0] if quick else [0, 1, 2]
    rounds = 3 if quick else None
    # one thread, as a Ray-simulated node gets: on a shared 2-core machine torch's default
    # (2 threads) ran this CNN 10x slower per step than one thread did
    torch.set_num_threads(1)
    rows = []
    for key, label, kind, extra in ROWS:
        row: dict[str, Any] = {"key": key, "label": label, "overrides": list(extra)}
        for k in HOSPITALS:
            runs = [one_run(key, kind, extra, k, s, rounds) for s in seeds]
            row[str(k)] = {"auc": summary(r["auc"] for r in runs),
                           "accuracy": summary(r["accuracy"] for r in runs),
                           "train_rows": runs[0]["train_rows"]}
            print(f"  breast {key} x{k}: AUC {fmt(row[str(k)]['auc'])}", flush=True)
        rows.append(row)
    fed = [r for r in rows if r["key"] != "central"]
    best = max(((r, k) for r in fed for k in HOSPITALS),
               key=lambda rk: rk[0][str(rk[1])]["auc"]["mean"])
    return {
        "seeds": seeds, "rounds": rounds or load_config(CONFIG).federation.rounds,
        "config": str(CONFIG.relative_to(ROOT)), "tuned_overrides": list(TUNED),
        "rows": rows, "reference": REFERENCE,
        "best": {"row": best[0]["key"], "hospitals": best[1]},
        "headline": {"breast_auc_federated_best": best[0][str(best[1])]["auc"]["mean"]},
    }


def markdown(res: dict[str, Any]) -> str:
    """Tables for RESULTS.md."""
    table = [[r["label"], *[r[str(k)][m] for k in HOSPITALS for m in ("auc", "accuracy")]]
             for r in res["rows"]]
    table.append(["MedMNIST v2 ResNet-18 (28), centralised, full train split",
                  REFERENCE["auc"], REFERENCE["accuracy"], "—", "—"])
    return "\n\n".join([
        f"Seeds {res['seeds']}, {res['rounds']} rounds; config `{res['config']}` with "
        f"overrides {res['tuned_overrides'] or 'none'} plus each row's own (in the JSON). "
        "Scores on the official BreastMNIST test split.",
        md_table(["configuration", "AUC, 5 hospitals", "acc, 5 hospitals",
                  "AUC, 20 hospitals", "acc, 20 hospitals"], table),
    ])
