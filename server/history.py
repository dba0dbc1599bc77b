"""Per-round metrics of a run: `metrics.jsonl`, `metrics.csv`, `summary.json` and PNG curves.

Each round holds `validation` (the check that picks `best`), `test` (the sites' test splits,
labelled "test — not used for any choice"), `sites` (each site's validation and test metrics)
and `train`. Files are rewritten atomically after every round, so they always describe the
completed rounds.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.atomic import atomic_write_bytes, atomic_write_text
from common.data.splits import TEST_LABEL
from common.metrics import mean_defined
from common.names import printable

if TYPE_CHECKING:
    from common.registry import Registry

PLOT_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity")
CSV_SPLITS = ("validation", "test")


def _line(r: dict[str, Any]) -> str:
    """One round of `metrics.jsonl`."""
    return json.dumps(r, sort_keys=True) + "\n"


def _mean_train_loss(r: dict[str, Any]) -> float | None:
    return mean_defined([m.get("loss") for m in r.get("train", {}).values()])


class RunHistory:
    """Collects the metrics of each round and writes the run directory's metric files."""

    def __init__(self, run_dir: Path, committed: int | None = None) -> None:
        """`committed`: when resuming, the last committed round; rows of later rounds (a
        round recorded, then killed before its commit) are dropped, as its version is."""
        self.run_dir = Path(run_dir)
        self.rounds: list[dict[str, Any]] = []
        # each round's JSON line, encoded once: re-encoding every earlier round (with every
        # site's metrics) on each record made a long run's bookkeeping grow with rounds^2
        self._lines: dict[int, str] = {}
        self._splits_text: str | None = None
        path = self.run_dir / "metrics.jsonl"
        if path.exists():  # resuming: keep the completed rounds
            lines = path.read_text(encoding="utf-8").splitlines()
            self.rounds = [json.loads(line) for line in lines if line.strip()]
            if committed is not None:
                self.rounds = [r for r in self.rounds if r["round"] <= committed]
            self._lines = {r["round"]: _line(r) for r in self.rounds}

    def record(self, server_round: int, metrics: dict[str, Any], elapsed: float) -> None:
        """Add (or replace) one round and rewrite the metric files."""
        row = {"round": server_round, "elapsed_s": round(elapsed, 3), **metrics}
        self.rounds = [r for r in self.rounds if r["round"] != server_round]
        self.rounds.append(row)
        self.rounds.sort(key=lambda r: r["round"])
        self._lines[server_round] = _line(row)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(self._lines[r["round"]] for r in self.rounds)
        atomic_write_text(self.run_dir / "metrics.jsonl", text)
        atomic_write_text(self.run_dir / "metrics.csv", self._csv())

    def write_splits(self, sizes: dict[str, dict[str, int]]) -> None:
        """`splits.json`: train / validation / test rows each site declared (written when
        they change; the server passes them after every round)."""
        text = json.dumps(sizes, indent=2, sort_keys=True) + "\n"
        if text == self._splits_text:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "splits.json", text)
        self._splits_text = text

    def _csv(self) -> str:
        rows = []
        for r in self.rounds:
            row: dict[str, Any] = {"round": r["round"], "elapsed_s": r["elapsed_s"]}
            for split in CSV_SPLITS:
                row.update({f"{split}_{k}": v for k, v in r.get(split, {}).items()
                            if not isinstance(v, str)})
            row["train_loss_mean"] = _mean_train_loss(r)
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
        """`round 3/10  elapsed 12.4s  validation auc 0.873  ...  test auc 0.850 (...)`."""
        r = next(x for x in self.rounds if x["round"] == server_round)
        val, test = r.get("validation", {}), r.get("test", {})

        def fmt(v: Any) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        parts = [f"round {server_round}/{total}", f"elapsed {r['elapsed_s']:.1f}s",
                 f"validation {metric} {fmt(val.get(metric))}"]
        if metric != "balanced_accuracy":
            parts.append(f"balanced accuracy {fmt(val.get('balanced_accuracy'))}")
        if test:
            parts.append(f"| test {metric} {fmt(test.get(metric))} ({TEST_LABEL})")
        return "  ".join(parts)

    def finish(self, traffic: dict[str, Any], site_models: dict[str, Any], registry: Registry,
               best_metric: str, final: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write `summary.json` and the plots; returns the summary.

        `site_models` maps each site to the model it keeps (see client/node.py); `extra` adds
        top-level keys (e.g. `privacy`: the differential-privacy report).
        """
        last = self.rounds[-1] if self.rounds else {}
        chosen = (final or {}).get("version")
        at_final = next((r for r in self.rounds if r["round"] == chosen), last)
        summary = {
            "rounds": last.get("round", 0),
            "validation": at_final.get("validation", {}),
            "test": at_final.get("test", {}),
            "sites": at_final.get("sites", {}),
            "final": final or {},
            "site_models": site_models,
            "traffic": traffic,
            "latest": registry.read_pointer("latest"),
            "best": registry.read_pointer("best"),
            "best_metric": best_metric,
            "test_label": TEST_LABEL,
            **(extra or {}),
        }
        atomic_write_text(self.run_dir / "summary.json",
                          json.dumps(summary, indent=2, sort_keys=True) + "\n")
        self.plot()
        return summary

    def plot(self) -> None:
        """`metrics.png` (validation solid, test dashed and labelled) and `loss.png`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, name in enumerate(PLOT_METRICS):
            colour = f"C{i}"
            for split, style in (("validation", "-"), ("test", "--")):
                values = [r.get(split, {}).get(name) for r in self.rounds]
                if all(v is None for v in values):
                    continue
                label = f"{name} ({'validation' if split == 'validation' else 'test*'})"
                ax.plot(rounds, [float("nan") if v is None else v for v in values],
                        linestyle=style, marker="o" if split == "validation" else "x",
                        color=colour, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("metric of the global model")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"Global model per round\n* {TEST_LABEL}", fontsize=9)
        self._save(fig, "metrics.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        held = [r.get("validation", {}).get("loss") for r in self.rounds]
        ax.plot(rounds, [float("nan") if v is None else v for v in held], marker="o",
                label="validation loss")
        train = [_mean_train_loss(r) for r in self.rounds]
        ax.plot(rounds, [float("nan") if v is None else v for v in train], marker="s",
                label="mean local train loss")
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


def _fmt(v: Any) -> str:
    return "undef" if v is None else f"{v:.3f}"


def _auc_ci(m: dict[str, Any]) -> str:
    if m.get("auc") is None:
        return "undef"
    lo, hi = m.get("auc_lo"), m.get("auc_hi")
    return f"{m['auc']:.3f} [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None else _fmt(m["auc"])


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return lines


def format_table(summary: dict[str, Any]) -> str:
    """The final tables: validation and test per site, then each site's own model."""
    cols = ("balanced_accuracy", "auc", "sensitivity", "specificity", "accuracy")
    header = ["global model", "split", "n", *cols]
    rows: list[list[str]] = []
    for site, m in sorted(summary.get("sites", {}).items()):
        for split in ("validation", "test"):
            part = m.get(split, {})
            rows.append([site, split if split == "validation" else "test*",
                         str(int(part.get("n", 0) or 0)), *[_fmt(part.get(k)) for k in cols]])
    for split in ("validation", "test"):
        part = summary.get(split, {})
        if part:
            name = "VALIDATION (server check)" if split == "validation" else "ALL SITES"
            rows.append([name, split if split == "validation" else "test*",
                         str(int(part.get("n", 0) or 0)), *[_fmt(part.get(k)) for k in cols]])
    lines = _grid(header, rows)
    models = summary.get("site_models") or {}
    if models:
        head2 = ["site model (test*)", "kept", "threshold", "balanced_accuracy",
                 "auc [95% CI]", "sensitivity", "specificity", "global BA", "global AUC [95% CI]"]
        rows2 = []
        for site, sm in sorted(models.items()):
            mine, glob = sm["site_model"]["test"], sm["global"]["test"]
            rows2.append([site, sm["kept"], f"{sm['operating_point']['threshold']:.3f}",
                          _fmt(mine.get("balanced_accuracy")), _auc_ci(mine),
                          _fmt(mine.get("sensitivity")), _fmt(mine.get("specificity")),
                          _fmt(glob.get("balanced_accuracy")), _auc_ci(glob)])
        rows2.append(["MEAN OF SITES", "", "",
                      _fmt(mean_defined([m["site_model"]["test"].get("balanced_accuracy")
                                         for m in models.values()])), "",
                      _fmt(mean_defined([m["site_model"]["test"].get("sensitivity")
                                         for m in models.values()])),
                      _fmt(mean_defined([m["site_model"]["test"].get("specificity")
                                         for m in models.values()])),
                      _fmt(mean_defined([m["global"]["test"].get("balanced_accuracy")
                                         for m in models.values()])), ""])
        lines += ["", *_grid(head2, rows2)]
        for site, sm in sorted(models.items()):
            # the method and reason are the hospital's words: no escape sequences reach a terminal
            lines.append(f"  {printable(site)}: kept the {sm['kept']} model "
                         f"({printable(sm['method'])}): {printable(sm['reason'])}")
    lines += ["", f"* {TEST_LABEL}: every choice above was made on validation splits."]
    return "\n".join(lines)
