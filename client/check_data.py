"""`medfed check-data`: validate a hospital's file against a bundle before joining a federation.

The file is read by the very functions the client (:func:`client.local_data.hospital_site`) and
``medfed predict`` (:func:`client.predict.read_inputs`) use, so "ok" here means the client or
predict will accept it; any problem raises the same one-sentence error they would raise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from client.local_data import data_config, hospital_site
from client.predict import read_inputs
from client.trust import open_manifest, verification_key
from common.data.csv_source import read_csv_frame, read_header
from common.data.schema import DataError, Schema, bad_rows
from common.manifest import spec_from_manifest

PURPOSES = ("training", "prediction")


@dataclass(frozen=True)
class DataCheck:
    """What a valid file holds: rows, and columns (CSV) or the image shape (C, H, W)."""

    rows: int
    columns: int | None = None
    image_shape: tuple[int, ...] | None = None
    warnings: tuple[str, ...] = ()
    splits: dict[str, int] | None = None  # training: rows per split, as the client splits

    def summary(self) -> str:
        """``ok: N rows, M columns`` (tables) or ``ok: N images of shape CxHxW``."""
        what = (f"{self.rows} images of shape {'x'.join(map(str, self.image_shape))}"
                if self.image_shape is not None else f"{self.rows} rows, {self.columns} columns")
        if self.splits:
            what += (f" (train {self.splits['train']}, validation {self.splits['validation']}, "
                     f"test {self.splits['test']})")
        return f"ok: {what}"


def _header_width(path: Path) -> int:
    # Only called after the file passed validation, so it is readable UTF-8 CSV; columns
    # without a name were empty (the reader left them out) and are not counted.
    return sum(1 for name in read_header(path) if name)


def _repeated_rows_warning(schema: Schema, data: Path, test_data: Path | None
                           ) -> tuple[str, ...]:
    """Rows that repeat another row exactly (every schema column and the label, as written).

    If they are the same patients, the client's carved validation and test splits, or the
    hospital's own test file, can hold patients it trained on: optimistic figures. Different
    patients can share every value, so this warns and counts; it does not refuse."""
    names = [c.name for c in schema.columns] + [schema.label]
    train = read_csv_frame(data)[names]
    warnings = []
    repeated = train.duplicated(keep="first")
    if repeated.any():
        warnings.append(
            f"{bad_rows(repeated)} {_repeat(repeated)} an earlier row exactly: if they are the "
            "same patients, the validation and test splits carved from this file can hold "
            "patients it trains on, and their figures are optimistic; remove the repeats")
    if test_data is not None:
        seen = set(train.itertuples(index=False, name=None))
        test = read_csv_frame(test_data)[names]
        shared = pd.Series([row in seen for row in test.itertuples(index=False, name=None)],
                           index=test.index)
        if shared.any():
            warnings.append(
                f"{bad_rows(shared)} of the test file {test_data.name} {_repeat(shared)} a "
                f"row of {data.name} exactly: if they are the same patients, the test figures "
                "are optimistic; keep each patient in one file")
    return tuple(warnings)


def _repeat(flags: Any) -> str:
    return "repeats" if int(flags.sum()) == 1 else "repeat"


def _one_class_warning(labels: np.ndarray, names: list[str]) -> tuple[str, ...]:
    """A site with one class can still train (its gradient is real), but its AUC is undefined."""
    present = np.unique(labels)
    if len(present) >= 2:
        return ()
    only = names[int(present[0])] if len(present) == 1 else "?"
    return (
        f"all {len(labels)} rows have label '{only}': this site can train, but its local AUC "
        "is undefined and it pulls the model towards that class",
    )


def check_data(
    model_dir: Path, data: Path, purpose: str = "training", public_key: Path | None = None,
    *, certs: Path | None = None, unsigned: bool = False, test_data: Path | None = None,
) -> DataCheck:
    """Validate `data` for `purpose` (training or prediction) against the bundle in `model_dir`.

    Raises
    ------
    DataError
        If `purpose` is unknown or the file does not match the bundle's schema or input shape.
    BundleError
        If the bundle is missing, fails a hash check or (with `public_key`) its signature.
    """
    if purpose not in PURPOSES:
        raise DataError(f"--purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    data = Path(data)
    if not data.exists():
        raise DataError(f"data file {data} does not exist")
    manifest: dict[str, Any] = open_manifest(Path(model_dir),
                                             verification_key(public_key, certs, unsigned))
    splits = None
    if purpose == "training":
        site = hospital_site(data, "check", manifest, data_config(manifest), test_data)
        labels = np.concatenate([site.y_train, site.y_val, site.y_test])
        x = site.x_train
        warnings = _one_class_warning(labels, list(manifest["labels"]))
        schema = spec_from_manifest(manifest).schema
        if schema is not None:  # a table: a repeated patient would leak across the splits
            warnings += _repeated_rows_warning(schema, data, test_data)
        splits = site.sizes()
    else:
        x = read_inputs(data, manifest).x
        labels, warnings = np.zeros(len(x)), ()
    if x.ndim == 4:
        return DataCheck(len(labels), image_shape=tuple(x.shape[1:]), warnings=warnings,
                         splits=splits)
    return DataCheck(len(labels), columns=_header_width(data), warnings=warnings,
                     splits=splits)
