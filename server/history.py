"""Per-round metrics of a run: `metrics.jsonl`, `metrics.csv`, `summary.json` and PNG curves.

Files are rewritten atomically after every round, so they always describe the completed rounds.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from server.registry import Registry

TABLE_METRICS = ("accuracy", "sensitivity", "specificity", "auc", "f1")
PLOT_METRICS = ("accuracy", "auc", "f1", "sensitivity", "specificity")


class RunHistory:
    """Collects the metrics of each round and writes the run directory's metric files."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.rounds: list[dict[str, Any]] = []
        path = self.run_dir / "metrics.jsonl"
        if path.exists():  # resuming: keep the completed rounds
            lines = path.read_text(encoding="utf-8").splitlines()
            self.rounds = [json.loads(line) for line in lines if line.strip()]

    def record(self, server_round: int, metrics: dict[str, Any], elapsed: float) -> None:
        """Add (or replace) one round and rewrite the metric files."""
        self.rounds = [r for r in self.rounds if r["round"] != server_round]
        self.rounds.append({"round": server_round, "elapsed_s": round(elapsed, 3), **metrics})
        self.rounds.sort(key=lambda r: r["round"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rounds)
        atomic_write_text(self.run_dir / "metrics.jsonl", text)
        atomic_write_text(self.run_dir / "metrics.csv", self._csv())

    def _csv(self) -> str:
        rows = []
        for r in self.rounds:
            row: dict[str, Any] = {"round": r["round"], "elapsed_s": r["elapsed_s"]}
            row.update({f"heldout_{k}": v for k, v in r.get("heldout", {}).items()})
            losses = [m["loss"] for m in r.get("train", {}).values() if m.get("loss") is not None]
            row["train_loss_mean"] = sum(losses) / len(losses) if losses else None
            rows.append(row)
        fields: list[str] = []
        for row in rows:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def progress_line(self, server_round: int, total: int, metric: str) -> str:
        """`round 3/10  elapsed 12.4s  held-out auc 0.873  accuracy 0.812`."""
        r = next(x for x in self.rounds if x["round"] == server_round)
        held = r.get("heldout", {})

        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        parts = [f"round {server_round}/{total}", f"elapsed {r['elapsed_s']:.1f}s",
                 f"held-out {metric} {fmt(held.get(metric))}"]
        if metric != "accuracy":
            parts.append(f"accuracy {fmt(held.get('accuracy'))}")
        return "  ".join(parts)

    def finish(self, traffic: dict[str, Any], adaptation: dict[str, Any], registry: Registry,
               best_metric: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write `summary.json` and the plots; returns the summary.

        `extra` adds top-level keys (e.g. `privacy`: the differential-privacy report).
        """
        last = self.rounds[-1] if self.rounds else {}
        summary = {
            "rounds": last.get("round", 0),
            "heldout": last.get("heldout", {}),
            "sites": last.get("sites", {}),
            "adaptation": adaptation,
            "traffic": traffic,
            "latest": registry.read_pointer("latest"),
            "best": registry.read_pointer("best"),
            "best_metric": best_metric,
            **(extra or {}),
        }
        atomic_write_text(self.run_dir / "summary.json",
                          json.dumps(summary, indent=2, sort_keys=True) + "\n")
        self.plot()
        return summary

    def plot(self) -> None:
        """`heldout_metrics.png` and `loss.png` (one point per round)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in PLOT_METRICS:
            values = [r.get("heldout", {}).get(name) for r in self.rounds]
            ax.plot(rounds, [float("nan") if v is None else v for v in values], marker="o",
                    label=name)
        ax.set_xlabel("round")
        ax.set_ylabel("held-out metric")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("Global model on the held-out set")
        self._save(fig, "heldout_metrics.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        held = [r.get("heldout", {}).get("loss") for r in self.rounds]
        ax.plot(rounds, [float("nan") if v is None else v for v in held], marker="o",
                label="held-out loss")
        train = []
        for r in self.rounds:
            losses = [m["loss"] for m in r.get("train", {}).values() if m.get("loss") is not None]
            train.append(sum(losses) / len(losses) if losses else float("nan"))
        ax.plot(rounds, train, marker="s", label="mean local train loss")
        ax.set_xlabel("round")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("Loss per round")
        self._save(fig, "loss.png")

    def _save(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.run_dir / name, buf.getvalue())


def format_table(summary: dict[str, Any]) -> str:
    """The final table: one row per site and one for the held-out set."""
    header = ["site", "n", *TABLE_METRICS]
    rows: list[list[str]] = []

    def fmt(v: Any) -> str:
        return "undef" if v is None else f"{v:.3f}"

    for site, m in sorted(summary.get("sites", {}).items()):
        rows.append([site, str(int(m.get("num-examples", m.get("n", 0)) or 0)),
                     *[fmt(m.get(k)) for k in TABLE_METRICS]])
    sites = summary.get("sites", {})
    if len(sites) > 1:
        rows.append(["MEAN OF SITES", "", *[fmt(_mean([m.get(k) for m in sites.values()]))
                                            for k in TABLE_METRICS]])
    held = summary.get("heldout", {})
    rows.append(["HELD-OUT", str(int(held.get("n", 0) or 0)),
                 *[fmt(held.get(k)) for k in TABLE_METRICS]])
    adaptation = summary.get("adaptation") or {}
    for site, m in sorted(adaptation.items()):
        rows.append([f"{site} (adapted)", str(int(m.get("num-examples", 0) or 0)),
                     *[fmt(m.get(f"after-{k}")) for k in TABLE_METRICS]])
    if len(adaptation) > 1:
        rows.append(["MEAN OF SITES (adapted)", "",
                     *[fmt(_mean([m.get(f"after-{k}") for m in adaptation.values()]))
                       for k in TABLE_METRICS]])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _mean(values: list[Any]) -> float | None:
    """Mean over sites of a metric, ignoring sites where it is undefined."""
    defined = [float(v) for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None
