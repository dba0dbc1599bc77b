"""`medfed model-card`: a markdown summary of a verified bundle (global or a site's model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.trust import open_manifest, verification_key
from common.data.schema import Schema
from common.data.splits import TEST_LABEL

CARD_METRICS = ("balanced_accuracy", "sensitivity", "specificity", "auc", "accuracy", "brier",
                "ece")


def _fmt(value: Any) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def _metric_rows(name: str, metrics: dict[str, Any]) -> str:
    n = metrics.get("n", metrics.get("num-examples"))
    cells = " | ".join(_fmt(metrics.get(k)) for k in CARD_METRICS)
    return f"| {name} | {int(n) if n is not None else '?'} | {cells} |"


def _cell(text: str) -> str:
    """Text for a table cell: a '|' would end the cell."""
    return text.replace("|", "\\|")


def _code(value: Any) -> str:
    """A code as the file writes it: a number, or a word (quoted; '|' escaped for the table)."""
    if isinstance(value, str):
        return '"' + value.replace("|", "\\|") + '"'
    return f"{value:g}"


def _allowed(col: dict[str, Any]) -> str:
    """What a column accepts, in words (binary columns have no range)."""
    if col.get("categories"):
        return "codes " + ", ".join(_code(c) for c in col["categories"])
    if col["type"] == "binary":
        return "0 or 1"
    lo, hi = col.get("min"), col.get("max")
    if lo is None and hi is None:
        return "any number"
    if lo is None:
        return f"at most {hi:g}"
    if hi is None:
        return f"at least {lo:g}"
    return f"{lo:g} to {hi:g}"


def _missing(col: dict[str, Any], policy: str) -> str:
    text = policy if policy != "constant" else f"constant {_code(col.get('fill_value'))}"
    if col.get("missing_values"):
        text += " (also " + ", ".join(_code(v) for v in col["missing_values"]) + ")"
    if col.get("missing_indicator"):
        text += " + indicator"
    return text


def _metrics_rows(metrics: dict[str, Any]) -> list[str]:
    rows = []
    named = (("validation", "validation (picks `best`)"), ("test", f"test ({TEST_LABEL})"),
             ("site-validation", "this site, validation"),
             ("site-test", f"this site, test ({TEST_LABEL})"),
             ("global-validation", "global model at this site, validation"),
             ("global-test", f"global model at this site, test ({TEST_LABEL})"),
             ("source-train", "pretraining cohort, train"),
             ("source-validation", "pretraining cohort, validation"),
             ("source-test", f"pretraining cohort, test ({TEST_LABEL})"))
    for key, label in named:
        if metrics.get(key):
            source = metrics[key].get("source") if key == "validation" else None
            # which validation set picked `best`: the sites', the pretraining cohort's, a file
            shown = f"{label}: {_cell(str(source))}" if source else label
            rows.append(_metric_rows(shown, metrics[key]))
    for name, site in sorted((metrics.get("sites") or {}).items()):
        for split in ("validation", "test"):
            if site.get(split):
                shown = split if split == "validation" else f"test ({TEST_LABEL})"
                rows.append(_metric_rows(f"site {name}, {shown}", site[split]))
    return rows


def model_card(model_dir: Path, public_key: Path | None = None, *, certs: Path | None = None,
               unsigned: bool = False) -> str:
    """The model card of the bundle in `model_dir` (signature and hashes verified)."""
    m = open_manifest(model_dir, verification_key(public_key, certs, unsigned))
    cfg = m.get("config", {})
    fed = cfg.get("federation", {})
    op = m.get("operating_point") or {}
    site = m.get("site")
    title = f"site model of {site['name']}" if site else "global model"
    lines = [
        f"# Model card: {m.get('name')} v{m.get('version')} ({title})",
        "",
        f"- **Model**: {m['model'].get('family')} backbone + linear head, "
        f"{m['model'].get('num_classes')} classes ({', '.join(m.get('labels', []))})",
        *([f"- **Positive class** (what sensitivity, p(positive) and the threshold refer "
           f"to): {m['labels'][1]}"] if len(m.get("labels", [])) == 2 else []),
        f"- **Pretrained on**: {m.get('source')}",
        f"- **Federated rounds**: {m.get('round')} with strategy `{m.get('strategy')}`, "
        f"trainable part `{m.get('trainable')}`",
        f"- **Data sites**: {', '.join(m.get('sites') or []) or 'none (pretrained only)'}",
        f"- **Federation data**: {fed.get('data', {}).get('source')} "
        f"(partition `{fed.get('data', {}).get('partition')}`, normalisation "
        f"`{m['preprocessing']['normalisation'].get('mode')}`)",
        f"- **Operating point**: temperature {op.get('temperature', 1.0):.3f}, decision "
        f"threshold {op.get('threshold', 0.5):.3f} (rule `{op.get('rule', 'fixed:0.5')}`, "
        f"fitted on {op.get('fitted_on') or 'nothing: defaults'})",
        f"- **Signed by**: `{m.get('signer', 'unknown')}`; file hashes verified; signature "
        + ("NOT checked (--unsigned)" if unsigned else "verified"),
        f"- **Created**: {m.get('created')}",
    ]
    if site:
        lines += [
            f"- **Site model**: kept the {site['kept']} model ({site['method']}): "
            f"{site['reason']}",
            f"- **Based on**: global version {site['based_on_version']}; statistics: "
            f"{site['statistics']}",
        ]
    lines += ["", "## Metrics", "",
              "| evaluation set | n | " + " | ".join(CARD_METRICS) + " |",
              "|---|---:|" + "---:|" * len(CARD_METRICS),
              *_metrics_rows(m.get("metrics", {})), "",
              "Every choice (best version, adaptation, calibration, threshold) was made on "
              "validation data; test figures are only reported. AUC is *undefined* on a set "
              "with a single class.", "", "## Intended use", "",
              str(m.get("intended_use", "")), "", "## Inputs", ""]
    pre = m["preprocessing"]
    if pre.get("kind") == "tabular" and pre.get("schema"):
        schema = Schema.from_dict(pre["schema"])
        lines.append("| column | type | unit | allowed values | missing values |")
        lines.append("|---|---|---|---|---|")
        for col, parsed in zip(pre["schema"]["columns"], schema.columns, strict=True):
            lines.append(f"| {col['name']} | {col['type']} | {col.get('unit', '')} | "
                         f"{_allowed(col)} | {_missing(col, schema.policy(parsed))} |")
    else:
        lines.append(f"Images of shape {pre.get('input_shape')} (channels, height, width).")
    return "\n".join(lines) + "\n"
