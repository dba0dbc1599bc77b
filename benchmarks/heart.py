"""Benchmark 1: Fed-Heart-Disease, FLamby protocol, honest model selection.

FLamby's preprocessing and its seed-43 train/test split per centre; our validation split is
carved from each centre's train split (20%, stratified, seeded), so FLamby's test splits stay
untouched. Every choice is made on validation: the hyper-parameters of the global model
(sweep 1, by the mean validation AUC that also picks `best`), the personalisation settings
(sweep 2, by the mean over centres of the site models' validation balanced accuracy), the
version each run keeps (`best` on validation) and which row becomes a headline. Test figures
are only reported.

Reported per row (mean ± std over 5 seeds; the seed drives pretraining, initialisation,
batch order and dropout): FLamby's metric, the mean over centres of test accuracy; the mean
over centres of test balanced accuracy and of test AUC; per centre, test AUC with its 95%
bootstrap interval (mean of the per-seed bounds). Federated rows come from
:mod:`benchmarks.emulate`; the headline row is also run with the real `medfed simulate`.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import emulate
from benchmarks.util import ROOT, WORK, bench_env, fmt, md_table, medfed, require_ok, run_cmd
from benchmarks.util import summary as over_seeds
from common.config import Config
from common.config_check import load_config
from common.data.federated import load_federated
from common.metrics import mean_defined
from common.scoring import OperatingPoint, logits64, score_model, score_with_intervals

CONFIG = ROOT / "configs" / "heart.yaml"
SITES = ("cleveland", "hungary", "switzerland", "va")
SEEDS = (0, 1, 2, 3, 4)
# FLamby (du Terrail et al., NeurIPS 2022), Fed-Heart-Disease: mean over centres of accuracy
FLAMBY = (("FLamby: pooled training", 0.735), ("FLamby: FedAvg", 0.685),
          ("FLamby: FedYogi", 0.731), ("FLamby: FedAvg + local fine-tuning", 0.735))
# Sweep 1 (global model, FedAvg transfer): every combination, chosen by validation AUC.
GLOBAL_GRID: dict[str, tuple[Any, ...]] = {
    "pretrain.optim.epochs": (10, 30),
    "federation.local.lr": (0.01, 0.05),
    "federation.local.weight_decay": (0.0, 0.01),
    "federation.rounds": (10, 20),
}
# Sweep 2 (site models, on the chosen global settings): chosen by the cross-fitted validation
# balanced accuracy (emulate.cross_fitted_ba), never by test.
SITE_GRID: dict[str, tuple[Any, ...]] = {
    "federation.adaptation.steps": (25, 100),
    "federation.adaptation.lr": (0.005, 0.02),
    "federation.adaptation.proximal_mu": (0.0, 1.0),
    "federation.adaptation.selection_metric": ("loss", "auc"),
    "federation.operating_point.threshold": ("fixed:0.5", "youden"),
}
# (key, label, kind, extra overrides); kind: majority | local | pooled | fed, "+scratch" =
# no pretraining
ROWS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("majority", "Per-centre majority class of its training split (trivial)", "majority", ()),
    ("local-transfer", "Local only, pretrained backbone, head", "local", ()),
    ("pooled-transfer", "Pooled centralised, pretrained backbone, head", "pooled", ()),
    ("fedavg-logreg", "FedAvg, logistic regression from scratch (FLamby's model)",
     "fed+scratch", ("model.hidden=[]", "model.trainable=all")),
    ("fedavg-scratch", "FedAvg, MLP from scratch", "fed+scratch", ("model.trainable=all",)),
    ("fedavg-transfer", "FedAvg, transfer (pretrained backbone, head)", "fed", ()),
    ("fedprox-transfer", "FedProx, transfer", "fed", ("federation.strategy.name=fedprox",)),
    ("fedyogi-transfer", "FedYogi, transfer", "fed", ("federation.strategy.name=fedyogi",)),
)
SIM_ROW = "fedavg-transfer"  # the configuration also run with the real `medfed simulate`
# the site-model figures carry one look at test (the note in EXTRA_NOTES): said with each
SITE_MODEL_FIGURES = ("heart_mean_centre_acc_personalised",
                      "heart_mean_centre_balanced_acc_personalised",
                      "heart_min_site_balanced_acc_gain")
SITE_RULE_NOTE = ("the site-model selection criterion (cross-fitted validation balanced "
                  "accuracy) and operating_point.min_class_rows were set after a look at the "
                  "first run's test figures (RESULTS.md section 1); first-run personalised "
                  "figures: 0.722 accuracy, 0.736 balanced accuracy")
EXTRA_NOTES = "\n\n".join([
    "**Targets (issue 10, 5 seeds, honest protocol) and how far off.** One global model, mean "
    "centre accuracy >= 0.76: missed; the row chosen on validation AUC is FLamby's logistic "
    "regression from scratch (validation AUC 0.873 vs 0.864 for transfer), at 0.691 test "
    "accuracy (-0.069); the best federated row, FedYogi transfer, reaches 0.736 (-0.024). "
    "Personalised, mean centre accuracy >= 0.80 and balanced accuracy >= 0.78: missed; the "
    "row chosen on the cross-fitted validation balanced accuracy (MLP from scratch) gives "
    "0.764 (-0.036) and 0.760 (-0.020); the transfer rows' site models reach 0.745-0.758 and "
    "0.786-0.791 but were not chosen. No site worse than the global model on balanced "
    "accuracy: missed at Switzerland for the chosen row (-0.053: its test split has a single "
    "negative, so its balanced accuracy moves by 0.5 with that one patient) and by 0.001 at "
    "Hungary; no site model was a constant predictor on any seed. (Figures of the run of "
    "2026-12-01 recorded above.) The earlier headlines (0.752 global, 0.818 personalised) "
    "were chosen on these test splits and do not hold.",
    "**Tried.** Sweep 1 (16 global settings: pretraining epochs, local learning rate, weight "
    "decay, rounds) moves the validation AUC by less than 0.004: the global model is limited "
    "by the data (four centres of 30-159 training rows, one all-positive), not by these "
    "knobs. Sweep 2 (32 site-model settings: fine-tuning steps, learning rate, proximal "
    "pull, the guard's metric, the threshold rule) is in the table above.",
    "**One change made after looking at test figures, disclosed.** The first full run (kept "
    "as `benchmarks/results/heart-first-run.json`) chose the site-model settings by the "
    "in-sample validation balanced accuracy. Youden's threshold maximises exactly that "
    "quantity on the rows it is fitted to, so the rule won by construction (0.739 vs 0.645) "
    "and, on test, lowered balanced accuracy at Long Beach VA by 0.126 (4 validation "
    "negatives). Two changes followed: the selection criterion became the cross-fitted "
    "validation balanced accuracy (rule fitted on one half of each centre's validation "
    "split, scored on the other), and a threshold rule now needs 10 validation rows of each "
    "class (`operating_point.min_class_rows`, else 0.5). Both are sound on their own, but "
    "they were prompted by test figures, so the personalised rows above carry that one "
    "look at the test splits. First-run figures: personalised 0.722 accuracy / 0.736 "
    "balanced accuracy (chosen row); the transfer row's site models 0.710 / 0.760.",
])


def _sets(grid: dict[str, tuple[Any, ...]]) -> list[tuple[str, ...]]:
    keys = list(grid)
    return [tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True))
            for combo in itertools.product(*grid.values())]


def row_config(extra: tuple[str, ...], seed: int) -> Config:
    """configs/heart.yaml + the row's overrides + the seed."""
    return load_config(CONFIG, [*extra, f"seed={seed}"])


def _metrics(d: dict[str, Any], keys: tuple[str, ...] = ("accuracy", "balanced_accuracy", "auc",
                                                          "sensitivity", "specificity")
             ) -> dict[str, Any]:
    out = {k: d.get(k) for k in keys}
    for k in ("auc_lo", "auc_hi"):
        if k in d:
            out[k] = d[k]
    return out


def _constant(m: dict[str, Any]) -> bool:
    """True when a site's decisions on a split were all one class."""
    sens, spec = m.get("sensitivity"), m.get("specificity")
    return (sens in (0.0, None) and spec in (1.0, None)) or (sens in (1.0, None)
                                                              and spec in (0.0, None))


def _baseline(cfg: Config, kind: str, home: Path) -> dict[str, Any]:
    """Majority, local-only or pooled training (same optimiser steps as the federation)."""
    bundle = None if "scratch" in kind else emulate.bundle_for(cfg, home / "bundles",
                                                               home / "signing.key")
    model, stats = emulate.start_model(cfg, bundle, home / "signing.key",
                                       pretrained=bundle is not None)
    data = load_federated(cfg.federation.data, stats, seed=cfg.seed)
    if kind == "majority":
        sites = {}
        for s in data.sites:
            rate = float(np.mean(s.y_train))
            logits = np.log(np.array([[1 - rate, rate]]).clip(1e-6, 1 - 1e-6))
            sites[s.name] = {split: score_with_intervals(np.repeat(logits, len(y), axis=0), y,
                                                         OperatingPoint(), cfg.seed)
                             for split, y in (("validation", s.y_val), ("test", s.y_test))}
        return {"sites": sites}
    budget = cfg.federation.rounds * cfg.federation.local.steps
    if kind.startswith("local"):
        optim = replace(cfg.federation.local, steps=budget)
        models = [emulate.train_alone(cfg, model, s.x_train, s.y_train, optim,
                                      emulate.node_seed(cfg, i, 0))
                  for i, s in enumerate(data.sites)]
    else:  # pooled: one model, the sum of the sites' budgets
        optim = replace(cfg.federation.local, steps=budget * len(data.sites))
        x = np.concatenate([s.x_train for s in data.sites])
        y = np.concatenate([s.y_train for s in data.sites])
        models = [emulate.train_alone(cfg, model, x, y, optim, cfg.seed)] * len(data.sites)
    op = OperatingPoint()
    return {"sites": {s.name: {"validation": score_model(m, s.x_val, s.y_val, op),
                               "test": score_with_intervals(logits64(m, s.x_test), s.y_test,
                                                            op, cfg.seed)}
                      for m, s in zip(models, data.sites, strict=True)}}


def federated(cfg: Config, kind: str, home: Path, site_cfgs: tuple[Config, ...] | None = None
              ) -> dict[str, Any]:
    """One emulated federation; site models for `cfg` (or for each of `site_cfgs`)."""
    bundle = None if "scratch" in kind else emulate.bundle_for(cfg, home / "bundles",
                                                               home / "signing.key")
    model, stats = emulate.start_model(cfg, bundle, home / "signing.key",
                                       pretrained=bundle is not None)
    data = load_federated(cfg.federation.data, stats, seed=cfg.seed)
    out = emulate.federate(cfg, model, data, personalise=site_cfgs is None)
    if site_cfgs is not None:
        out["site_models_by"] = [emulate.site_models(c, model, data) for c in site_cfgs]
    return out


def one_run(extra: tuple[str, ...], kind: str, seed: int, home: Path) -> dict[str, Any]:
    """One row, one seed."""
    cfg = row_config(extra, seed)
    if kind.startswith("fed"):
        return federated(cfg, kind, home)
    return _baseline(cfg, kind, home)


def _site_mean(runs: list[dict[str, Any]], pick: Any) -> dict[str, Any]:
    """Over seeds, the mean over centres of `pick(run, site)`."""
    return over_seeds(mean_defined([pick(r, s) for s in SITES]) for r in runs)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of a row's figures (global and, where present, site models)."""

    def glob(split: str, key: str) -> Any:
        return lambda r, s: r["sites"][s][split].get(key)

    out: dict[str, Any] = {
        "mean_centre_acc": _site_mean(runs, glob("test", "accuracy")),
        "mean_centre_balanced_acc": _site_mean(runs, glob("test", "balanced_accuracy")),
        "mean_centre_auc": _site_mean(runs, glob("test", "auc")),
        "validation": {k: _site_mean(runs, glob("validation", k))
                       for k in ("accuracy", "balanced_accuracy", "auc")},
        "sites": {s: {k: over_seeds(r["sites"][s]["test"].get(k) for r in runs)
                      for k in ("accuracy", "balanced_accuracy", "auc", "auc_lo", "auc_hi")}
                  for s in SITES},
    }
    if all("validation" in r and r.get("validation") for r in runs):
        out["server_validation_auc"] = over_seeds(r["validation"].get("auc") for r in runs)
        out["chosen_version"] = [r["version"] for r in runs]
    if all("site_models" in r for r in runs):
        out["site_models"] = site_model_figures([r["site_models"] for r in runs])
    return out


def site_model_figures(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of the site models' figures, and the guard's bookkeeping."""

    def mine(split: str, key: str) -> Any:
        return lambda sm, s: sm[s]["site_model"][split].get(key)

    def site_mean(pick: Any) -> dict[str, Any]:
        return over_seeds(mean_defined([pick(sm, s) for s in SITES]) for sm in per_seed)

    gains = {s: over_seeds(
        None if sm[s]["site_model"]["test"].get("balanced_accuracy") is None
        else sm[s]["site_model"]["test"]["balanced_accuracy"]
        - sm[s]["global"]["test"]["balanced_accuracy"] for sm in per_seed) for s in SITES}
    return {
        "mean_centre_acc": site_mean(mine("test", "accuracy")),
        "mean_centre_balanced_acc": site_mean(mine("test", "balanced_accuracy")),
        "mean_centre_auc": site_mean(mine("test", "auc")),
        "validation_balanced_acc": site_mean(mine("validation", "balanced_accuracy")),
        "cross_fitted_validation_balanced_acc": site_mean(
            lambda sm, s: sm[s].get("cross_fitted_validation_balanced_accuracy")),
        "sites": {s: {**{k: over_seeds(sm[s]["site_model"]["test"].get(k) for sm in per_seed)
                         for k in ("accuracy", "balanced_accuracy", "auc", "auc_lo", "auc_hi",
                                   "sensitivity", "specificity")},
                      "kept_adapted": sum(sm[s]["kept"] == "adapted" for sm in per_seed),
                      "constant_on_test": sum(_constant(sm[s]["site_model"]["test"])
                                              for sm in per_seed),
                      "validation_has_both_classes": sum(
                          (sm[s]["site_model"]["validation"].get("positives") or 0)
                          not in (0, sm[s]["site_model"]["validation"].get("n"))
                          for sm in per_seed),
                      "balanced_acc_gain": gains[s]}
                  for s in SITES},
        "min_site_balanced_acc_gain": min(g["mean"] for g in gains.values()
                                          if g["mean"] is not None),
    }


def sweep_global(home: Path, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Sweep 1: federations of FedAvg transfer, scored by mean validation AUC."""
    rows = []
    for sets in _sets(GLOBAL_GRID):
        runs = [federated(row_config(sets, s), "fed", home, site_cfgs=()) for s in seeds]
        rows.append({"overrides": list(sets),
                     "validation_auc": over_seeds(r["validation"].get("auc") for r in runs),
                     "test_mean_centre_acc": _site_mean(
                         runs, lambda r, s: r["sites"][s]["test"].get("accuracy"))})
        print(f"  heart sweep 1 {sets}: validation AUC {fmt(rows[-1]['validation_auc'])}",
              flush=True)
    best = max(rows, key=lambda r: r["validation_auc"]["mean"])
    return {"rows": rows, "chosen": best["overrides"], "selected_on": "validation",
            "rule": "highest mean over seeds of the server's validation AUC"}


def sweep_sites(base: tuple[str, ...], home: Path, seeds: tuple[int, ...]) -> dict[str, Any]:
    """Sweep 2: site-model settings on the chosen federation, by validation balanced acc."""
    combos = _sets(SITE_GRID)
    per_combo: list[list[dict[str, Any]]] = [[] for _ in combos]
    for s in seeds:
        cfgs = tuple(row_config((*base, "federation.adaptation.enabled=true", *c), s)
                     for c in combos)
        res = federated(cfgs[0], "fed", home, site_cfgs=cfgs)
        for i, sm in enumerate(res["site_models_by"]):
            per_combo[i].append(sm)
    rows = []
    for combo, sms in zip(combos, per_combo, strict=True):
        fig = site_model_figures(sms)
        rows.append({"overrides": list(combo),
                     "validation_balanced_acc": fig["validation_balanced_acc"],
                     "cross_fitted_validation_balanced_acc":
                         fig["cross_fitted_validation_balanced_acc"],
                     "test_mean_centre_balanced_acc": fig["mean_centre_balanced_acc"]})
        print(f"  heart sweep 2 {combo}: cross-fitted validation BA "
              f"{fmt(fig['cross_fitted_validation_balanced_acc'])}", flush=True)
    best = max(rows, key=lambda r: r["cross_fitted_validation_balanced_acc"]["mean"])
    return {"rows": rows, "chosen": best["overrides"], "selected_on": "validation",
            "rule": "highest mean over seeds and centres of the site models' cross-fitted "
                    "validation balanced accuracy (rule fitted on one half of a centre's "
                    "validation split, scored on the other, both ways)"}


def real_simulation(extra: tuple[str, ...], seed: int, home: Path) -> dict[str, Any]:
    """`medfed pretrain` + `medfed simulate` of the headline row; its summary.json figures."""
    cfg = row_config(extra, seed)
    bundle = emulate.bundle_for(cfg, home / "bundles", home / "signing.key")
    out = WORK / "heart-sim" / f"seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    sets = [a for o in [*extra, f"seed={seed}"] for a in ("--set", o)]
    log = WORK / "logs" / f"heart-sim-seed{seed}.log"
    res = run_cmd(medfed("simulate", "--config", str(CONFIG), *sets, "--bundle", str(bundle),
                         "--out", str(out)), bench_env(home), log)
    require_ok(res, log)
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    return {"wall_s": res.wall_s, "version": s["final"]["version"],
            "sites": {n: s["sites"][n]["test"]["accuracy"] for n in SITES},
            "site_models": {n: s["site_models"][n]["site_model"]["test"]["accuracy"]
                            for n in SITES}}


def agreement(real: dict[str, Any], emu: dict[str, Any]) -> float:
    """Largest absolute difference between real and emulated test accuracies of one seed."""
    diffs = [abs(real["sites"][n] - emu["sites"][n]["test"]["accuracy"]) for n in SITES]
    diffs += [abs(real["site_models"][n] - emu["site_models"][n]["site_model"]["test"]
                  ["accuracy"]) for n in SITES]
    diffs.append(float(real["version"] != emu["version"]))
    return max(diffs)


def run(quick: bool) -> dict[str, Any]:
    """Sweeps, every row over the seeds, the real simulation check."""
    torch.set_num_threads(1)  # Ray gives each simulated node one CPU; tiny models run faster
    seeds = SEEDS[:1] if quick else SEEDS
    home = WORK / "home"
    if quick:
        global_sweep = {"rows": [], "chosen": [], "selected_on": "validation",
                        "rule": "skipped in --quick"}
        site_sweep = {"rows": [], "chosen": [], "selected_on": "validation",
                      "rule": "skipped in --quick"}
    else:
        global_sweep = sweep_global(home, seeds)
        site_sweep = sweep_sites(tuple(global_sweep["chosen"]), home, seeds)
    chosen = (*global_sweep["chosen"], "federation.adaptation.enabled=true",
              *site_sweep["chosen"])
    rows, per_seed = [], {}
    for key, label, kind, extra in ROWS:
        runs = [one_run((*chosen, *extra), kind, seed, home) for seed in seeds]
        per_seed[key] = runs
        rows.append({"key": key, "label": label, "kind": kind, "overrides": list(extra),
                     **aggregate(runs)})
        print(f"  heart {key}: mean centre acc {fmt(rows[-1]['mean_centre_acc'])}", flush=True)
    real = []
    for i, seed in enumerate(seeds):
        r = real_simulation(chosen, seed, home)
        r["seed"] = seed
        r["max_abs_diff_vs_emulation"] = agreement(r, per_seed[SIM_ROW][i])
        real.append(r)
    fed = [r for r in rows if r["kind"].startswith("fed")]
    # which rows become headlines: chosen on validation too
    head_global = max(fed, key=lambda r: r["server_validation_auc"]["mean"])
    head_site = max(fed, key=lambda r: r["site_models"][
        "cross_fitted_validation_balanced_acc"]["mean"])
    sm = head_site["site_models"]
    return {
        "seeds": list(seeds), "config": str(CONFIG.relative_to(ROOT)),
        "chosen_overrides": list(chosen), "sweep_global": global_sweep,
        "sweep_sites": site_sweep, "rows": rows, "flamby": dict(FLAMBY),
        "real_simulation": real, "headline_rows": {"global": head_global["key"],
                                                   "personalised": head_site["key"]},
        "headline": {key: {"value": value, "split": "test", "selected_on": "validation",
                           "seeds": len(seeds), **({"rule_note": SITE_RULE_NOTE}
                                                   if key in SITE_MODEL_FIGURES else {})}
                     for key, value in (
            ("heart_mean_centre_acc_global", head_global["mean_centre_acc"]["mean"]),
            ("heart_mean_centre_acc_personalised", sm["mean_centre_acc"]["mean"]),
            ("heart_mean_centre_balanced_acc_personalised",
             sm["mean_centre_balanced_acc"]["mean"]),
            ("heart_min_site_balanced_acc_gain", sm["min_site_balanced_acc_gain"]))},
    }


def headline_notes(res: dict[str, Any]) -> dict[str, Any]:
    """`res["headline"]` with the split of each value and the note on the site-model rule
    (for stored results too: applied when rendering)."""
    out = {k: dict(v) for k, v in res.get("headline", {}).items()}
    for key, value in out.items():
        value["split"] = "test"
        if key in SITE_MODEL_FIGURES:
            value["rule_note"] = SITE_RULE_NOTE
    return out


def _ci(site: dict[str, Any]) -> str:
    auc, lo, hi = site["auc"]["mean"], site["auc_lo"]["mean"], site["auc_hi"]["mean"]
    if auc is None:
        return "undef."
    return f"{auc:.3f} [{fmt(lo)}, {fmt(hi)}]"


def markdown(res: dict[str, Any]) -> str:
    """Tables for RESULTS.md."""
    main = []
    for r in res["rows"]:
        sm = r.get("site_models", {})
        main.append([r["label"], r["mean_centre_acc"], r["mean_centre_balanced_acc"],
                     r["mean_centre_auc"], sm.get("mean_centre_acc", "—"),
                     sm.get("mean_centre_balanced_acc", "—"), sm.get("mean_centre_auc", "—")])
    main += [[label, value, "—", "—", "—", "—", "—"] for label, value in res["flamby"].items()]
    per_site = []
    for r in res["rows"]:
        per_site.append([r["label"], *[_ci(r["sites"][s]) for s in SITES]])
        if "site_models" in r:
            per_site.append([r["label"] + ", site models",
                             *[_ci(r["site_models"]["sites"][s]) for s in SITES]])
    guard = []
    for r in res["rows"]:
        if "site_models" not in r:
            continue
        guard.append([r["label"], *[
            f"{fmt(r['site_models']['sites'][s]['balanced_acc_gain'])} "
            f"(adapted {r['site_models']['sites'][s]['kept_adapted']}/{len(res['seeds'])}, "
            f"constant {r['site_models']['sites'][s]['constant_on_test']})" for s in SITES]])
    sweep1 = [[" ".join(r["overrides"]), r["validation_auc"], r["test_mean_centre_acc"]]
              for r in res["sweep_global"]["rows"]]
    sweep2 = [[" ".join(r["overrides"]), r["cross_fitted_validation_balanced_acc"],
               r["validation_balanced_acc"], r["test_mean_centre_balanced_acc"]]
              for r in res["sweep_sites"]["rows"]]
    real = [[str(r["seed"]), str(r["version"]), *[fmt(r["sites"][s]) for s in SITES],
             *[fmt(r["site_models"][s]) for s in SITES], fmt(r["max_abs_diff_vs_emulation"]),
             f"{r['wall_s']:.0f} s"] for r in res["real_simulation"]]
    parts = [
        f"Seeds {res['seeds']} (mean ± std over seeds); config `{res['config']}` with the "
        f"validation-chosen overrides {res['chosen_overrides'] or 'none'} plus each row's own. "
        f"Headline rows (chosen on validation): global `{res['headline_rows']['global']}`, "
        f"personalised `{res['headline_rows']['personalised']}`. All figures are on FLamby's "
        "test splits, which chose nothing.",
        md_table(["configuration", "mean centre acc (FLamby's metric)", "mean centre balanced "
                  "acc", "mean centre AUC", "site models: mean centre acc", "site models: "
                  "balanced acc", "site models: AUC"], main),
        "Per centre, test AUC [95% bootstrap interval] (mean over seeds of the AUC and of the "
        "bounds; Switzerland's test split has one negative, so its AUC rests on one case):",
        md_table(["configuration", *SITES], per_site),
        "Site models against the global model at each centre, test balanced accuracy gain "
        "(site model − global; how many seeds kept the adapted model; how many seeds gave a "
        "constant predictor on test):",
        md_table(["configuration", *SITES], guard),
    ]
    if sweep1:
        parts += [f"Sweep 1, global model ({res['sweep_global']['rule']}):",
                  md_table(["overrides", "validation AUC", "test mean centre acc (reported, "
                            "not used)"], sweep1)]
    if sweep2:
        parts += [f"Sweep 2, site models ({res['sweep_sites']['rule']}):",
                  md_table(["overrides", "cross-fitted validation balanced acc (chooses)",
                            "in-sample validation balanced acc", "test balanced acc "
                            "(reported, not used)"], sweep2)]
    parts += [
        f"Real `medfed simulate` of the row '{SIM_ROW}' (Flower simulation runtime) vs the "
        "in-process emulation, same seeds (test accuracies; last columns: largest absolute "
        "difference, wall time):",
        md_table(["seed", "version", *SITES, *[f"{s} site model" for s in SITES],
                  "max diff", "wall"], real),
    ]
    return "\n\n".join(parts)
