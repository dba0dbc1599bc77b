"""The server's check of every global model: a validation set, never a test split.

Modes (`federation.heldout`):

- ``validation`` (default): the sites' validation splits, evaluated at the sites; the server
  aggregates their metrics (mean over sites weighted by rows). No patient row moves.
- ``validation-median``: the same splits, aggregated by the median over sites weighted by rows.
  A site's scores are its own word: under the mean one site moves the figure, and so `best`,
  by up to its share of the rows whatever the others measured; under the median a site (or
  several) holding less than half the rows cannot move it outside the range the other sites
  report.
- ``source-validation``: the validation split of the pretraining cohort, held by the server
  and preprocessed with the bundle's statistics (the cohort's own training statistics).
- ``file:PATH``: the operator's own labelled CSV or npz, validated against the bundle's
  schema. With ``normalisation: site`` it is preprocessed with statistics fitted on the file
  itself (it is the server's own site); with ``bundle``, with the bundle's.

The sites' test metrics are aggregated the same way and labelled "test — not used for any
choice"; nothing reads them to choose anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config
from common.config_check import AT_SITES, MEDIAN_MODE
from common.data.csv_source import read_csv_checked
from common.data.medmnist import read_labelled_npz
from common.data.preprocess import SiteStats
from common.data.schema import DataError, encode
from common.data.splits import TEST_LABEL, DataSpec
from common.metrics import COUNT_KEYS
from common.models import SplitModel
from common.scoring import OperatingPoint, score_model

SITES_LABEL = "the sites' validation splits ({} over sites, weighted by rows)"
# how each mode the sites evaluate combines their metrics: ``mean`` or ``median``
_COMBINE = {"validation": "mean", MEDIAN_MODE: "median"}
assert set(_COMBINE) == set(AT_SITES)


def site_combine(mode: str) -> str:
    """How the sites' metrics combine under heldout `mode` (``mean`` outside the site modes:
    the sites' test metrics are still aggregated)."""
    return _COMBINE.get(mode, "mean")


def aggregate_sites(per_site: list[dict[str, Any]], combine: str = "mean") -> dict[str, Any]:
    """Mean (or, `combine` ``median``, median) of each metric over sites weighted by their
    rows (`n`), skipping undefined ones.

    Counts (`n`, `positives`) add up. An empty list gives an empty dict.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    scored: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, float] = {}
    for metrics in per_site:
        w = float(metrics.get("n") or 0)
        for key, value in metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if key in COUNT_KEYS:
                counts[key] = counts.get(key, 0.0) + float(value)
            elif w > 0 and np.isfinite(value):
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + w
                scored.setdefault(key, []).append((float(value), w))
    out: dict[str, Any] = ({k: sums[k] / weights[k] for k in sums} if combine == "mean" else
                           {k: weighted_median(v) for k, v in scored.items()})
    out.update({k: int(v) for k, v in counts.items()})
    return out


def weighted_median(pairs: list[tuple[float, float]]) -> float:
    """The value at half the total weight of (`value`, `weight`) pairs (weights > 0); where a
    half falls exactly between two values, their midpoint (equal weights: the usual median).

    Values holding less than half the weight cannot move it outside the others' range.
    """
    ordered = sorted(pairs)
    half = sum(w for _, w in ordered) / 2
    below = 0.0
    for i, (value, w) in enumerate(ordered):
        below += w
        if below > half:
            return value
        if below == half:
            return (value + ordered[i + 1][0]) / 2
    return ordered[-1][0]  # not reached: the weights sum to twice `half`


@dataclass
class Heldout:
    """The configured validation check; `x`, `y` only for the server-held modes."""

    mode: str
    label: str
    x: np.ndarray | None = None
    y: np.ndarray | None = None

    @property
    def at_sites(self) -> bool:
        """True when the sites evaluate it (the server holds no rows)."""
        return self.mode in AT_SITES

    def evaluate(self, model: SplitModel, sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Validation metrics of the global model now loaded in `model`."""
        if self.at_sites:
            out = aggregate_sites([s["validation"] for s in sites.values() if "validation" in s],
                                  site_combine(self.mode))
        else:
            assert self.x is not None and self.y is not None
            out = score_model(model, self.x, self.y, OperatingPoint())
        return {**out, "split": "validation", "source": self.label}


def aggregate_test(sites: dict[str, dict[str, Any]], combine: str = "mean") -> dict[str, Any]:
    """The sites' test metrics, aggregated like the validation ones and labelled."""
    tests = [s["test"] for s in sites.values() if "test" in s]
    if not tests:
        return {}
    return {**aggregate_sites(tests, combine), "label": TEST_LABEL}


def _read_file(path: Path, spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    if spec.kind == "tabular":
        if spec.schema is None:
            raise DataError(f"heldout file {path}: the bundle has no tabular schema")
        x, y = encode(read_csv_checked(path, spec.schema), spec.schema, str(path))
        assert y is not None  # read_csv_checked required the label column
        return x, y
    x, y = read_labelled_npz(path)
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise DataError(f"heldout file {path}: images have shape {tuple(x.shape[1:])}, the "
                        f"model expects {tuple(spec.input_shape)}")
    return x, y


def build_heldout(cfg: Config, spec: DataSpec, bundle_stats: SiteStats) -> Heldout:
    """The check `cfg.federation.heldout` names, with its rows loaded and preprocessed."""
    mode = cfg.federation.heldout
    if mode in AT_SITES:
        return Heldout(mode, SITES_LABEL.format(_COMBINE[mode]))
    if mode == "source-validation":
        from common.pretrain import load_source  # noqa: PLC0415 (server-side only)

        source = load_source(cfg)
        x, y = source.pooled("validation")
        label = f"validation split of the pretraining cohort ({source.name(cfg.pretrain.data)})"
        return Heldout(mode, label, bundle_stats.apply(x), y)
    path = Path(mode.split(":", 1)[1])
    if not path.exists():
        raise DataError(f"config key 'federation.heldout': file {path} does not exist")
    x, y = _read_file(path, spec)
    if cfg.federation.data.normalisation == "site":
        stats = SiteStats.fit(x, spec.schema, bundle_stats, where=f"heldout file {path}")
    else:
        stats = bundle_stats
    return Heldout(mode, f"the operator's file {path}", stats.apply(x), y)


def preflight(cfg: Config, bundle_dir: Path) -> Heldout:
    """Build the validation check before any process starts: a bad file is one sentence.

    Called by `medfed simulate` (which also reads the hospitals' data first) and
    `medfed server`.
    """
    from common.bundle import read_manifest  # noqa: PLC0415

    # a bundle that cannot learn the federation's task stops here, before any process starts
    return task_and_heldout(cfg, read_manifest(Path(bundle_dir)))[1]


def task_and_heldout(cfg: Config, manifest: dict[str, Any]) -> tuple[DataSpec, Heldout]:
    """The task the run publishes versions for (the bundle's model, the federation data's
    class names; refused when the model cannot learn it) and the check it names."""
    from common.data.federated import declared_spec, named  # noqa: PLC0415
    from common.manifest import stats_from_manifest, task_spec  # noqa: PLC0415

    data = cfg.federation.data
    # a name the operator gives wins: hospitals bringing their own images declare nothing
    spec = named(task_spec(manifest, declared_spec(data)), data.labels, "federation.data.labels",
                 "the bundle's model has")
    return spec, build_heldout(cfg, spec, stats_from_manifest(manifest))
