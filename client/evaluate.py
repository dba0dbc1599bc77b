"""`medfed evaluate`: score a verified bundle on a labelled file, with intervals and plots.

Scored exactly as `medfed predict` predicts (same statistics, float64 logits, the bundle's
calibration and threshold), so on a site's test split it reproduces the figures medfed
reported for that site's model. Every metric gets a seeded 95% bootstrap interval; the report
also holds the confusion matrix, and with `--out` a ROC curve and a reliability diagram.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from client.predict import loaded_model, naming_errors_after, read_inputs
from client.trust import site_stats_for
from common.atomic import atomic_write_bytes, atomic_write_text
from common.manifest import json_metrics
from common.metrics import ECE_BINS, bootstrap_intervals
from common.scoring import OperatingPoint, logits64, score

REPORT_METRICS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
                  "f1", "auc", "brier", "ece", "loss")


def evaluate_file(model_dir: Path, data: Path, site_stats: Path | None = None,
                  public_key: Path | None = None, *, certs: Path | None = None,
                  unsigned: bool = False, seed: int = 0, samples: int = 1000
                  ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The report of `model_dir` on the labelled `data`; also (labels, probabilities)."""
    model, bundle = loaded_model(model_dir, public_key, certs, unsigned)
    manifest = bundle.manifest
    x_raw, y, _, _ = read_inputs(data, manifest, require_label=True)
    stats, stats_from = site_stats_for(bundle, site_stats)
    assert y is not None  # require_label
    op = OperatingPoint.from_dict(manifest.get("operating_point"))
    logits = logits64(model, stats.apply(x_raw))
    metrics = score(logits, y, op)
    proba = op.proba(logits)
    intervals = bootstrap_intervals(y, proba, op.threshold, samples=samples, seed=seed)
    labels = [str(v) for v in manifest["labels"]]
    pred = op.decide(proba)
    k = proba.shape[1]
    confusion = [[int(np.sum((y == t) & (pred == p))) for p in range(k)] for t in range(k)]
    report = json_metrics({
        "model": str(model_dir), "version": manifest.get("version"),
        "site": (manifest.get("site") or {}).get("name"), "data": str(data), "rows": int(len(y)),
        "statistics": stats_from, "operating_point": op.to_dict(), "metrics": metrics,
        "intervals_95": {m: list(v) if v is not None else None for m, v in intervals.items()},
        "bootstrap": {"samples": samples, "seed": seed},
        "confusion_matrix": {"rows_true_columns_predicted": labels, "counts": confusion},
        # every row the same answer on a file holding several classes: a failure as a
        # diagnosis model, whatever its accuracy
        "constant_predictor": bool(len(np.unique(y)) > 1 and len(np.unique(pred)) < 2),
    })
    return report, y, proba


def format_report(report: dict[str, Any]) -> str:
    """The table `medfed evaluate` prints."""
    m, ci = report["metrics"], report["intervals_95"]
    who = f"site model of {report['site']}" if report.get("site") else "global model"
    lines = [f"{report['model']} ({who}, v{report['version']}) on {report['data']}: "
             f"{report['rows']} rows, threshold {report['operating_point']['threshold']:.3f}",
             f"statistics: {report['statistics']}", "",
             f"{'metric':<18} {'value':>8}   95% bootstrap interval"]
    for key in REPORT_METRICS:
        if key not in m:
            continue
        value = m[key]
        shown = "undefined" if value is None else f"{value:.4f}"
        pair = ci.get(key)
        interval = "—" if pair is None else f"[{pair[0]:.4f}, {pair[1]:.4f}]"
        lines.append(f"{key:<18} {shown:>8}   {interval}")
    cm = report["confusion_matrix"]
    lines += ["", "confusion matrix (rows: true, columns: predicted): "
              + ", ".join(cm["rows_true_columns_predicted"])]
    lines += ["  " + " ".join(f"{c:>6}" for c in row) for row in cm["counts"]]
    if m.get("auc") is None:
        lines.append("AUC is undefined: the file holds a single class.")
    if report.get("constant_predictor"):
        answer = cm["rows_true_columns_predicted"][next(
            j for j in range(len(cm["counts"])) if any(row[j] for row in cm["counts"]))]
        lines.append(f"WARNING: the model answers {answer} for every row: a constant "
                     "predictor, useless for diagnosis whatever its accuracy.")
    return "\n".join(lines)


PLOTS = ("roc", "reliability")


def report_paths(out: Path) -> list[Path]:
    """`out` (JSON) plus `<stem>_roc.png` and `<stem>_reliability.png`."""
    return [out, *(out.with_name(f"{out.stem}_{name}.png") for name in PLOTS)]


def write_report(report: dict[str, Any], y: np.ndarray, proba: np.ndarray, out: Path
                 ) -> list[Path]:
    """The files of :func:`report_paths`; the paths written."""
    json_path, *png_paths = report_paths(Path(out))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with naming_errors_after(json_path):
        atomic_write_text(json_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    for path, draw in zip(png_paths, (_roc, _reliability), strict=True):
        png = draw(y, proba, report)
        with naming_errors_after(path):
            atomic_write_bytes(path, png)
    return [json_path, *png_paths]


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(4.5, 4.5))


def _png(plt: Any, fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _roc(y: np.ndarray, proba: np.ndarray, report: dict[str, Any]) -> bytes:
    plt, fig, ax = _figure()
    score_col = proba[:, 1] if proba.shape[1] == 2 else proba.max(axis=1)
    truth = y == 1 if proba.shape[1] == 2 else y == proba.argmax(axis=1)
    if truth.all() or (~truth).all():
        ax.text(0.5, 0.5, "ROC undefined: one class", ha="center")
    else:
        order = np.argsort(-score_col, kind="stable")
        tps = np.concatenate([[0], np.cumsum(truth[order])]) / truth.sum()
        fps = np.concatenate([[0], np.cumsum(~truth[order])]) / (~truth).sum()
        ax.plot(fps, tps, label=f"AUC {report['metrics'].get('auc') or 0:.3f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC curve")
    return _png(plt, fig)


def _reliability(y: np.ndarray, proba: np.ndarray, report: dict[str, Any]) -> bytes:
    plt, fig, ax = _figure()
    conf = proba[:, 1] if proba.shape[1] == 2 else proba.max(axis=1)
    hit = (y == 1) if proba.shape[1] == 2 else (y == proba.argmax(axis=1))
    bins = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1)
    xs, ys = [], []
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            xs.append(float(conf[inside].mean()))
            ys.append(float(hit[inside].mean()))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    ax.plot(xs, ys, marker="o", label=f"ECE {report['metrics'].get('ece') or 0:.3f}")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left")
    return _png(plt, fig)
