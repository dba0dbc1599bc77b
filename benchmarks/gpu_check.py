"""The GPU path, checked on a GPU: `bash benchmarks/gpu_check.sh` (CUDA torch required).

1. Throughput: local training of the configs/breast.yaml model on BreastMNIST's train split,
   the same steps on CUDA and on one CPU thread, images per second each.
2. `medfed pretrain --device cuda` (1 epoch), `medfed simulate --device cuda` (5 hospitals,
   3 rounds, Flower's simulation runtime with a GPU share per ClientApp), `medfed predict
   --device cuda` on the official test images with a hospital's site model.
   With `--headline`, then configs/breast.yaml as it stands (its pretraining epochs and
   rounds) on CUDA: the headline setting's wall time and AUC there (`headline_*`).
3. Asserts: every simulated hospital's training event says its trained tensors were on a
   CUDA device (`device` in `nodes/*/events.jsonl`, read from the model's parameters after
   training), the simulation wrote its summary, and predict wrote one row per test image.

Prints one JSON object and writes it to `benchmarks/results/gpu_check.json` (read by
`python -m benchmarks.run` into RESULTS.md and headline.json). Exits 1, writing nothing, when
CUDA is not available. Nothing here needs a package a CPU-only install lacks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.util import RESULTS, ROOT, WORK, bench_env, machine, medfed, require_ok, run_cmd

CONFIG = ROOT / "configs" / "breast.yaml"
RESULT_FILE = RESULTS / "gpu_check.json"
NOT_RUN = "not run: no device lent"


def throughput(device: torch.device, steps: int) -> float:
    """Training images per second of the breast model on `device` (after 3 warm-up steps)."""
    from common.config_check import load_config
    from common.data.federated import load_federated
    from common.models import build_model
    from common.training import train_local

    cfg = load_config(CONFIG)
    # speed does not depend on the statistics: each site's own, as no bundle exists yet
    data = load_federated(replace(cfg.federation.data, normalisation="site"), None,
                          seed=cfg.seed)
    x = np.concatenate([s.x_train for s in data.sites])
    y = np.concatenate([s.y_train for s in data.sites])
    model = build_model(cfg.model.family, data.spec.input_shape, data.spec.num_classes,
                        cfg.model)
    optim = cfg.federation.local
    train_local(model, x, y, replace(optim, steps=3), "all", device, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = train_local(model, x, y, replace(optim, steps=steps), "all", device, 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert result.device.startswith(device.type), result.device
    return steps * optim.batch_size / (time.perf_counter() - start)


def train_devices(run_dir: Path) -> list[str]:
    """The `device` of every training event the simulated hospitals logged."""
    found = []
    for events in sorted((run_dir / "nodes").glob("*/events.jsonl")):
        for line in events.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("event") == "train":
                found.append(str(record.get("device")))
    return found


def federate(work: Path, env: dict[str, str], device: str, rounds: int | None,
             pretrain_epochs: int | None) -> tuple[Path, dict[str, Any]]:
    """`medfed pretrain` then `medfed simulate` of configs/breast.yaml on `device`, in `work`;
    None keeps the config's rounds or pretraining epochs. Returns (run directory, figures)."""
    bundle, sim = work / "pretrain", work / "sim"
    sets = [] if pretrain_epochs is None else ["--set", f"pretrain.optim.epochs={pretrain_epochs}"]
    log = work / "pretrain.log"
    res = run_cmd(medfed("pretrain", "--config", str(CONFIG), "--device", device, *sets,
                         "--out", str(bundle)), env, log)
    require_ok(res, log)
    out: dict[str, Any] = {"pretrain_wall_s": round(res.wall_s, 1)}
    log = work / "simulate.log"
    # a short check runs one head-only round, then full fine-tuning: both phases on `device`
    extra = [] if rounds is None else ["--rounds", str(rounds),
                                       "--set", "federation.head_warmup_rounds=1"]
    res = run_cmd(medfed("simulate", "--config", str(CONFIG), "--device", device,
                         "--bundle", str(bundle), *extra, "--out", str(sim)), env, log)
    require_ok(res, log)
    summary = json.loads((sim / "summary.json").read_text(encoding="utf-8"))
    devices = train_devices(sim)
    out.update({"simulate_wall_s": round(res.wall_s, 1), "rounds": summary["latest"]["version"],
                "version_kept": (summary.get("best") or {}).get("version"),
                "train_events": len(devices), "train_event_devices": sorted(set(devices)),
                "validation_auc": summary["validation"].get("auc"),
                "test_auc": summary["test"].get("auc"), "test_label": "reported, never chosen on"})
    kind = torch.device(device).type
    assert devices and all(d.startswith(kind) for d in devices), (
        f"simulated hospitals trained on {sorted(set(devices))}, not on {device}")
    return sim, out


def check(rounds: int, steps: int, device: str = "cuda", work: Path = WORK / "gpu-check"
          ) -> dict[str, Any]:
    """Throughput, a short federation and predict; raises AssertionError when the tensors
    were not on `device`."""
    if work.exists():
        shutil.rmtree(work)
    home = work / "home"
    env = bench_env(home)
    gpu = torch.device(device)
    torch.set_num_threads(1)
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else device
    out: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__,
        "cuda": torch.version.cuda, "machine": machine(),
        f"train_images_per_s_{gpu.type}": throughput(gpu, steps),
        "train_images_per_s_cpu_1_thread": throughput(torch.device("cpu"), max(steps // 10, 5)),
    }
    sim, figures = federate(work, env, device, rounds, pretrain_epochs=1)
    out.update(figures)
    from common.data.medmnist import load_medmnist_split

    images = load_medmnist_split("breast", "test")[0]
    np.save(work / "test_images.npy", images)
    # a hospital's site model: signed, with that hospital's statistics, as it predicts locally
    model_dir = sorted((sim / "nodes").glob("*/personalised"))[0]
    log = work / "predict.log"
    predictions = work / "predictions.csv"
    res = run_cmd(medfed("predict", "--model", str(model_dir), "--data",
                         str(work / "test_images.npy"), "--out", str(predictions),
                         "--public-key", str(home / "signing.pub"), "--device", device),
                  env, log)
    require_ok(res, log)
    rows = len(predictions.read_text(encoding="utf-8").splitlines()) - 1
    assert rows == len(images), f"predict wrote {rows} rows for {len(images)} images"
    out["predict_rows"] = rows
    return out


def headline_run(device: str = "cuda", work: Path = WORK / "gpu-check-headline"
                 ) -> dict[str, Any]:
    """configs/breast.yaml as it stands (its pretraining epochs and rounds) on `device`:
    the headline setting's wall time and AUC there, prefixed `headline_`."""
    if work.exists():
        shutil.rmtree(work)
    _, figures = federate(work, bench_env(work / "home"), device, None, None)
    return {f"headline_{k}": v for k, v in figures.items() if k != "test_label"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.gpu_check`."""
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="throughput steps on CUDA")
    parser.add_argument("--headline", action="store_true",
                        help="then also run configs/breast.yaml as it stands (its pretraining "
                             "epochs and rounds) on the GPU and add its figures")
    parser.add_argument("--dry-run-on-cpu", action="store_true",
                        help="the same steps on the CPU, to check this script; writes no result")
    args = parser.parse_args(argv)
    if args.dry_run_on_cpu:
        out = check(args.rounds, args.steps, "cpu", WORK / "gpu-check-cpu")
        if args.headline:
            out.update(headline_run("cpu", WORK / "gpu-check-cpu-headline"))
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    if not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available here (torch {torch.__version__}); install a "
              "CUDA build of torch on a machine with an NVIDIA GPU (see the Makefile's "
              "TORCH_INDEX)", file=sys.stderr)
        return 1
    out = check(args.rounds, args.steps)
    write_result(out)
    if args.headline:  # the short check is recorded even if this part fails
        out.update(headline_run())
        write_result(out)
    return 0


def write_result(out: dict[str, Any]) -> None:
    """Print the figures and write them to RESULT_FILE."""
    text = json.dumps(out, indent=2, sort_keys=True)
    print(text, flush=True)
    RESULT_FILE.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
