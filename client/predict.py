"""`medfed predict`: verified bundle + validated input -> one row of probabilities per input.

The inputs go through the statistics the model was evaluated with (the site model's own, the
hospital's `site_stats.json`, or the bundle's) and the model's operating point: calibrated
probabilities and the decision at the model's threshold. `medfed evaluate` scores the very
same way, so on the same rows both give exactly the reported metrics.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from client.trust import open_bundle, site_stats_for, verification_key
from common.atomic import atomic_write_text, refuse_replacing_input
from common.bundle import Bundle
from common.data.csv_source import has_column, read_csv_checked
from common.data.medmnist import load_image_file, read_labelled_npz
from common.data.schema import ROW_INDEX, DataError, encode
from common.device import resolve_device
from common.manifest import model_from_manifest, spec_from_manifest
from common.models import SplitModel, load_state
from common.scoring import OperatingPoint, logits64

ID_COLUMN = "id"  # an optional row identifier carried through to the predictions
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """A cell a spreadsheet will not run as a formula (leading =, +, -, @ get a quote)."""
    return "'" + text if text.startswith(_FORMULA_START) else text


class Inputs(NamedTuple):
    """A file's raw model inputs, labels (or None), `id` column (or None) and each input's row:
    its spreadsheet row number in a CSV (the header is row 1, as messages about the file say),
    its 0-based index among images."""

    x: np.ndarray
    y: np.ndarray | None
    ids: list[str] | None
    rows: list[int]


def read_inputs(data: Path, manifest: dict[str, Any], require_label: bool = False) -> Inputs:
    """Raw model inputs in `data`, validated against the manifest.

    Tables: a CSV matching the schema (an `id` column is allowed and carried through);
    missing cells stay NaN for the site statistics to fill. Images: .npz / .npy / PNG folder
    (labelled: an .npz with `images` and `labels`).
    """
    spec = spec_from_manifest(manifest)
    if spec.kind == "tabular":
        if spec.schema is None:
            raise DataError("the bundle has no tabular schema")
        keep = (ID_COLUMN,) if has_column(data, ID_COLUMN) else ()
        frame = read_csv_checked(data, spec.schema, require_label=require_label, keep=keep)
        ids = [str(v) for v in frame[ID_COLUMN].fillna("")] if keep else None
        x, y = encode(frame.drop(columns=list(keep)), spec.schema, str(data))
        rows = ([int(r) for r in frame.index] if frame.index.name == ROW_INDEX
                else list(range(2, len(x) + 2)))
        return Inputs(x, y, ids, rows)
    if require_label:
        x, y = read_labelled_npz(Path(data))
    else:
        x, y = load_image_file(data), None
    if tuple(x.shape[1:]) != tuple(spec.input_shape):
        raise DataError(f"{data}: images have shape {tuple(x.shape[1:])}, the model expects "
                        f"{tuple(spec.input_shape)}")
    return Inputs(x, y, None, list(range(len(x))))


def refuse_replacing_inputs(outputs: Sequence[Path], model_dir: Path, data: Path,
                            stats: Path | None) -> None:
    """Stop, before any work, when an output would replace an input: the data, the site
    statistics, or anything in the model directory (a bundle holds only what was signed)."""
    model = Path(model_dir).resolve()
    for out in outputs:
        where = Path(out).resolve()  # also through a link, or `..`
        if where == model or model in where.parents:
            raise FileExistsError(f"{out} is inside the model directory {model_dir}: writing "
                                  "there would change the bundle; choose another output path")
    refuse_replacing_input(outputs, [data, *([stats] if stats is not None else [])])


@contextmanager
def naming_errors_after(path: Path) -> Iterator[None]:
    """Writing `path`: an OS error that names no file (a full disk fails in write()) gets its
    name, so that the user is told which output could not be written."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err  # keeps the subclass
        raise


def loaded_model(model_dir: Path, public_key: Path | None, certs: Path | None = None,
                 unsigned: bool = False) -> tuple[SplitModel, Bundle]:
    """The verified bundle's model (all tensors loaded), and the bundle."""
    bundle = open_bundle(model_dir, verification_key(public_key, certs, unsigned))
    model = model_from_manifest(bundle.manifest)
    load_state(model, {**bundle.backbone, **bundle.head}, where=str(model_dir), complete=True)
    return model, bundle


def predict(model_dir: Path, data: Path, out: Path, public_key: Path | None = None,
            device: str = "auto", stats: Path | None = None, *, certs: Path | None = None,
            unsigned: bool = False) -> dict[str, Any]:
    """Write `out` (CSV: row, [id], decision, calibrated probability per class, threshold).

    `row` is the input's row in `data` as a spreadsheet numbers it (the header is row 1; the
    same numbers as the messages about the file), or the image's 0-based index.

    `device` is checked like everywhere else, but scoring runs in float64 on the CPU so that
    predictions equal what `medfed evaluate` reports.
    """
    resolve_device(device)
    refuse_replacing_inputs([out], model_dir, data, stats)
    model, bundle = loaded_model(model_dir, public_key, certs, unsigned)
    manifest = bundle.manifest
    x_raw, _, ids, rows = read_inputs(data, manifest)
    site_stats, stats_from = site_stats_for(bundle, stats)
    op = OperatingPoint.from_dict(manifest.get("operating_point"))
    proba = op.proba(logits64(model, site_stats.apply(x_raw)))
    labels = [csv_safe(str(name)) for name in manifest["labels"]]
    binary = proba.shape[1] == 2
    predicted = op.decide(proba)

    buf = io.StringIO()
    writer = csv.writer(buf)
    id_col = [ID_COLUMN] if ids is not None else []
    writer.writerow(["row", *id_col, "predicted", *[f"p_{name}" for name in labels],
                     *(["threshold"] if binary else [])])
    for i, (k, p) in enumerate(zip(predicted, proba, strict=True)):
        row_id = [csv_safe(ids[i])] if ids is not None else []
        writer.writerow([rows[i], *row_id, labels[int(k)], *[f"{v:.6f}" for v in p],
                         *([f"{op.threshold:.6f}"] if binary else [])])
    out.parent.mkdir(parents=True, exist_ok=True)
    with naming_errors_after(out):
        atomic_write_text(out, buf.getvalue())
    counts = {str(name): int((predicted == k).sum()) for k, name in enumerate(manifest["labels"])}
    return {"rows": len(x_raw), "counts": counts, "version": manifest.get("version"),
            "site": (manifest.get("site") or {}).get("name"), "statistics": stats_from,
            "operating_point": op.to_dict(),
            "mean_probability": {str(name): float(proba[:, k].mean())
                                 for k, name in enumerate(manifest["labels"])}}
