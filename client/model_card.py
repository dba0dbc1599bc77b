"""`medfed model-card`: a markdown summary of a verified bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.bundle import read_manifest
from common.signing import load_public_key

CARD_METRICS = ("accuracy", "sensitivity", "specificity", "auc", "f1", "brier", "ece")


def _fmt(value: Any) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _metric_rows(name: str, metrics: dict[str, Any]) -> str:
    n = metrics.get("num-examples", metrics.get("n"))
    cells = " | ".join(_fmt(metrics.get(k)) for k in CARD_METRICS)
    return f"| {name} | {int(n) if n is not None else '?'} | {cells} |"


def model_card(model_dir: Path, public_key: Path | None = None) -> str:
    """The model card of the bundle in `model_dir` (hashes, and signature if a key is given)."""
    pub = load_public_key(public_key) if public_key else None
    m = read_manifest(model_dir, pub)
    cfg = m.get("config", {})
    fed = cfg.get("federation", {})
    metrics = m.get("metrics", {})
    lines = [
        f"# Model card: {m.get('name')} v{m.get('version')}",
        "",
        f"- **Model**: {m['model'].get('family')} backbone + linear head, "
        f"{m['model'].get('num_classes')} classes ({', '.join(m.get('labels', []))})",
        f"- **Pretrained on**: {m.get('source')}",
        f"- **Federated rounds**: {m.get('round')} with strategy `{m.get('strategy')}`, "
        f"trainable part `{m.get('trainable')}`",
        f"- **Data sites**: {', '.join(m.get('sites') or []) or 'none (pretrained only)'}",
        f"- **Federation data**: {fed.get('data', {}).get('source')} "
        f"(partition `{fed.get('data', {}).get('partition')}`, normalisation "
        f"`{m['preprocessing']['normalisation'].get('mode')}`)",
        f"- **Signed by**: `{m.get('signer', 'unknown')}`; signature "
        f"{'verified' if pub else 'not checked (pass --public-key)'}; file hashes verified",
        f"- **Created**: {m.get('created')}",
        "",
        "## Metrics",
        "",
        "| evaluation set | n | " + " | ".join(CARD_METRICS) + " |",
        "|---|---:|" + "---:|" * len(CARD_METRICS),
    ]
    if "heldout" in metrics:
        lines.append(_metric_rows("held-out (server)", metrics["heldout"]))
    for name, site in sorted((metrics.get("sites") or {}).items()):
        lines.append(_metric_rows(f"site {name} (local test)", site))
    for name in ("source-test", "source-train"):
        if name in metrics:
            lines.append(_metric_rows(name, metrics[name]))
    lines += [
        "",
        "AUC is *undefined* on an evaluation set with a single class.",
        "",
        "## Intended use",
        "",
        str(m.get("intended_use", "")),
        "",
        "## Inputs",
        "",
    ]
    pre = m["preprocessing"]
    if pre.get("kind") == "tabular" and pre.get("schema"):
        lines.append("| column | type | unit | range / categories |")
        lines.append("|---|---|---|---|")
        for col in pre["schema"]["columns"]:
            rng = (", ".join(str(c) for c in col.get("categories", []))
                   or f"{col.get('min')} to {col.get('max')}")
            lines.append(f"| {col['name']} | {col['type']} | {col.get('unit', '')} | {rng} |")
    else:
        lines.append(f"Images of shape {pre.get('input_shape')} (channels, height, width).")
    return "\n".join(lines) + "\n"
