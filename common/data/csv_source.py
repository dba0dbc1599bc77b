"""Hospital CSV files checked against a schema: one file per site, or one file + a site column.

The same reader serves training (:func:`load_csv_sites`) and prediction
(:func:`read_csv_checked` with ``require_label=False``). Messages name the file and column and
count rows; they never quote cell values.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from common.config import DataConfig
from common.data.federated import DataSpec, SiteSplit, split_site
from common.data.schema import DataError, Schema, encode, load_schema, validate_frame

MISSING_MARKERS = ["", "NA", "NaN", "nan", "?"]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"data file {path} does not exist") from err
    except IsADirectoryError as err:
        raise DataError(f"data file {path} is a directory, expected a CSV file") from err
    try:
        text = raw.decode("utf-8-sig")  # tolerate a byte-order mark from spreadsheet exports
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text (first bad byte at offset {err.start}); save it as UTF-8 CSV"
        ) from err
    if not text.strip():
        raise DataError(f"{path}: the file is empty, expected a header row and data rows")
    return text


def read_csv_checked(
    path: str | Path, schema: Schema, require_label: bool = True, keep: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Read a UTF-8 CSV with a header and validate it against `schema`.

    `keep` names extra columns allowed beside the schema (e.g. the site column); they are
    returned but not validated. Cells stay text; :func:`common.data.schema.encode` converts.
    """
    path = Path(path)
    text = _read_text(path)
    header = [h.strip() for h in next(csv.reader(io.StringIO(text)))]
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        raise DataError(f"{path}: column '{dups[0]}' appears more than once in the header")
    try:
        df = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            na_values=MISSING_MARKERS,
            skipinitialspace=True,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(
            f"{path}: not a well-formed CSV file (rows with a wrong field count)"
        ) from err
    df.columns = header
    absent = [k for k in keep if k not in header]
    if absent:
        raise DataError(f"{path}: missing column '{absent[0]}'")
    validate_frame(df.drop(columns=list(keep)), schema, str(path), require_label)
    return df


def _frames(cfg: DataConfig, schema: Schema) -> list[tuple[str, str, pd.DataFrame]]:
    """(site name, where, frame) per site."""
    if not cfg.csv_paths:
        raise DataError("config key 'data.csv_paths' is empty; list one CSV file per site")
    if cfg.site_column:
        if len(cfg.csv_paths) != 1:
            raise DataError(
                f"config key 'data.site_column' needs exactly one file in 'data.csv_paths', "
                f"got {len(cfg.csv_paths)}"
            )
        path = cfg.csv_paths[0]
        df = read_csv_checked(path, schema, keep=(cfg.site_column,))
        site = df[cfg.site_column]
        if site.isna().any():
            raise DataError(
                f"{path}: column '{cfg.site_column}' has {int(site.isna().sum())} rows "
                f"without a site name"
            )
        return [
            (str(name), f"{path} (site {name})", part.drop(columns=[cfg.site_column]))
            for name, part in df.groupby(cfg.site_column, sort=True)
        ]
    stems = [Path(p).stem for p in cfg.csv_paths]
    dups = sorted({s for s in stems if stems.count(s) > 1})
    if dups:
        raise DataError(
            f"config key 'data.csv_paths' has two files named '{dups[0]}'; the file name "
            f"(without extension) is the site name and must be unique"
        )
    return [
        (stem, p, read_csv_checked(p, schema)) for stem, p in zip(stems, cfg.csv_paths, strict=True)
    ]


def load_csv_sites(cfg: DataConfig) -> tuple[DataSpec, list[SiteSplit]]:
    """One site per file (or per site-column value), each split with `cfg.split_seed`."""
    if not cfg.csv_schema:
        raise DataError("config key 'data.csv_schema' is empty; give the schema YAML file")
    schema = load_schema(cfg.csv_schema)
    sites = []
    for name, where, df in _frames(cfg, schema):
        x, y = encode(df, schema, where)
        assert y is not None  # read_csv_checked required the label column
        x_tr, y_tr, x_te, y_te = split_site(x, y, cfg.test_fraction, cfg.split_seed)
        sites.append(SiteSplit(name, x_tr, y_tr, x_te, y_te))
    names = tuple(schema.feature_names())
    return DataSpec("tabular", (len(names),), 2, schema.labels, names, schema), sites
