"""Hospital CSV files checked against a schema: one file per site, or one file + a site column.

The same reader serves training (:func:`load_csv_sites`) and prediction
(:func:`read_csv_checked` with ``require_label=False``). Messages name the file and column,
count rows and give the first rows' spreadsheet numbers (header: row 1); they never quote cell
values. Line endings of every spreadsheet (LF, CRLF, a lone CR) read the same.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from common.config import DataConfig
from common.data.schema import (
    MISSING_MARKERS,
    ROW_INDEX,
    DataError,
    Schema,
    bad_rows,
    duplicated_names,
    encode,
    load_schema,
    validate_frame,
)
from common.data.splits import DataSpec, SiteSplit, carve, with_validation


def read_text(path: Path) -> str:
    """The file's text, UTF-8 (a byte-order mark tolerated), every line ending read as "\n"
    (CRLF from Windows, a lone CR from older Mac spreadsheet exports)."""
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
    return text.replace("\r\n", "\n").replace("\r", "\n")


SEPARATORS = {";": "semicolon", "\t": "tab"}


def _refuse_other_separator(header: list[str], path: Path) -> None:
    """A header read as one column that holds a semicolon or a tab: the file was saved with
    another separator (spreadsheets in locales with decimal commas save ';'). Reading it anyway
    would misread its decimal commas, so the hospital re-exports it."""
    if len(header) != 1:
        return
    for sep, name in SEPARATORS.items():
        if sep in header[0]:
            raise DataError(
                f"{path}: the header is one column holding {header[0].count(sep)} {name}s, so "
                f"the file seems {name}-separated; save it as comma-separated CSV with '.' as "
                "the decimal point"
            )


def scan_rows(text: str, path: Path) -> tuple[list[str], list[int], set[int]]:
    """The header (names stripped), the row number of each data row as a spreadsheet shows it
    (the header is row 1, a blank line is an empty row; pandas skips those), and the rows whose
    every cell is empty (',,,' left by a spreadsheet where rows were cleared). Every row must
    have as many fields as the header: a trailing comma would shift columns."""
    header: list[str] | None = None
    rows: list[int] = []
    empty: set[int] = set()
    number = 0  # a record's row number as a spreadsheet shows it (a blank line is a row)
    try:
        for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row:
                continue
            if header is None:
                header = [h.strip() for h in row]
                _refuse_other_separator(header, path)
            elif len(row) != len(header):
                raise DataError(
                    f"{path}: row {number} has {len(row)} fields but the header has "
                    f"{len(header)} (a trailing comma or an unquoted comma inside a value?)"
                )
            else:
                rows.append(number)
                if not any(cell.strip() for cell in row):
                    empty.add(number)
    except csv.Error as err:  # e.g. a field over csv's size limit, an unclosed quote
        raise DataError(f"{path}: row {number + 1} is not valid CSV ({err})") from err
    return header or [], rows, empty


def _without_unnamed(df: pd.DataFrame, header: list[str], path: Path) -> pd.DataFrame:
    """`df` without the columns that have no name in the header and no value in any row (a
    spreadsheet saves ',,' after the last column when cells beyond it were ever formatted).
    An unnamed column that holds values is refused: it cannot be matched to the schema."""
    unnamed = [i for i, name in enumerate(header) if not name]
    for i in unnamed:
        held = df.iloc[:, i].notna()
        if held.any():
            raise DataError(f"{path}: column {i + 1} has no name in the header but "
                            f"{bad_rows(held)} hold a value there; name it or delete it")
    return df.drop(columns=df.columns[unnamed]) if unnamed else df


def read_csv_frame(path: Path) -> pd.DataFrame:
    """A CSV file's cells as text (missing markers as NaN), columns named by its header, rows
    indexed by their spreadsheet row numbers (index name :data:`ROW_INDEX`) so that a message
    about a value can say where it is."""
    text = read_text(path)
    header, rows, empty = scan_rows(text, path)
    dups = duplicated_names([name for name in header if name])
    if dups:
        raise DataError(f"{path}: column '{dups[0]}' appears more than once in the header")
    try:
        df = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            na_values=list(MISSING_MARKERS),
            skipinitialspace=True,
            index_col=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(
            f"{path}: not a well-formed CSV file (rows with a wrong field count)"
        ) from err
    df.columns = header
    if len(df) == len(rows):  # both count records; if they ever disagree, counts only
        df.index = pd.Index(rows, name=ROW_INDEX)
        if empty:  # rows with no value at all read as the blank lines they look like
            df = df.drop(index=sorted(empty))
    return _without_unnamed(df, header, path)


def read_csv_checked(
    path: str | Path, schema: Schema, require_label: bool = True, keep: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Read a UTF-8 CSV with a header and validate it against `schema`.

    `keep` names extra columns allowed beside the schema (e.g. the site column); they are
    returned but not validated. Cells stay text; :func:`common.data.schema.encode` converts.
    """
    path = Path(path)
    df = read_csv_frame(path)
    absent = [k for k in keep if k not in df.columns]
    if absent:
        raise DataError(f"{path}: missing column '{absent[0]}'")
    validate_frame(df.drop(columns=list(keep)), schema, str(path), require_label)
    return df


def read_header(path: str | Path) -> list[str]:
    """The header's names (stripped) as :func:`scan_rows` takes them: the first record that is
    not a blank line. Reads up to the header only."""
    with Path(path).open(encoding="utf-8-sig") as fh:
        # blank lines before the header are skipped, as the reader and pandas skip them
        return next(([h.strip() for h in row] for row in csv.reader(fh) if row), [])


def has_column(path: str | Path, name: str) -> bool:
    """True when the CSV's header names `name` (False for an unreadable file: the reader
    reports the real problem)."""
    try:
        return name in read_header(path)
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


SPLIT_VALUES = ("train", "validation", "test")


def _by_split(df: pd.DataFrame, split_column: str, where: str) -> dict[str, pd.DataFrame]:
    """Rows grouped by the split column's value (train, validation or test)."""
    values = df[split_column].fillna("").astype(str).str.strip().str.lower()
    bad = int((~values.isin(SPLIT_VALUES)).sum())
    if bad:
        raise DataError(f"{where}: column '{split_column}' has {bad} rows whose value is not "
                        f"one of {', '.join(SPLIT_VALUES)}")
    rest = df.drop(columns=[split_column])
    return {v: rest[values == v] for v in SPLIT_VALUES if (values == v).any()}


def site_from_frames(name: str, where: str, df: pd.DataFrame, test: pd.DataFrame | None,
                     schema: Schema, cfg: DataConfig) -> SiteSplit:
    """One site's three splits from its rows (and its test rows when given apart).

    Test rows come from `test` or the split column, else they are carved (`test_fraction`,
    `split_seed`); validation rows from the split column, else they are carved from train.
    Test rows never take part in any fitting: they are separated before anything is computed.
    """
    parts = _by_split(df, cfg.split_column, where) if cfg.split_column else {"train": df}
    if test is not None:
        if "test" in parts:
            raise DataError(f"{where}: rows marked 'test' in column '{cfg.split_column}' and a "
                            "test file were both given; use one of them")
        parts["test"] = test
    if "train" not in parts:
        raise DataError(f"{where}: no training rows (column '{cfg.split_column}')")
    encoded = {}
    for split, frame in parts.items():
        x, y = encode(frame, schema, f"{where} {split} rows")
        assert y is not None  # read_csv_checked required the label column
        encoded[split] = (x, y)
    x_tr, y_tr = encoded["train"]
    if "test" in encoded:
        x_te, y_te = encoded["test"]
    else:
        if len(y_tr) < 3:
            raise DataError(f"site '{name}' has {len(y_tr)} row(s): too few for a train, a "
                            "validation and a test split (at least 3 rows are needed)")
        x_tr, y_tr, x_te, y_te = carve(x_tr, y_tr, cfg.test_fraction, cfg.split_seed, keep=2)
    if "validation" in encoded:
        x_val, y_val = encoded["validation"]
        return SiteSplit(name, x_tr, y_tr, x_val, y_val, x_te, y_te)
    return with_validation(name, x_tr, y_tr, x_te, y_te, cfg.validation_fraction,
                           cfg.split_seed)


def _kept_columns(cfg: DataConfig) -> tuple[str, ...]:
    return tuple(c for c in (cfg.site_column, cfg.split_column) if c)


def _frames(cfg: DataConfig, paths: tuple[str, ...], key: str, schema: Schema
            ) -> list[tuple[str, str, pd.DataFrame]]:
    """(site name, where, frame) per site of the files under config key `key`."""
    keep = _kept_columns(cfg)
    if cfg.site_column:
        if len(paths) != 1:
            raise DataError(
                f"config key 'data.site_column' needs exactly one file in 'data.{key}', "
                f"got {len(paths)}"
            )
        path = paths[0]
        df = read_csv_checked(path, schema, keep=keep)
        # stripped like feature and split cells: 'A ' is hospital 'A', not a second site
        site = df[cfg.site_column].str.strip()
        site = site.mask(site == "")
        if site.isna().any():
            raise DataError(
                f"{path}: column '{cfg.site_column}' has {bad_rows(site.isna())} without a "
                "site name"
            )
        return [
            (str(name), f"{path} (site {name})", part.drop(columns=[cfg.site_column]))
            for name, part in df.groupby(site, sort=True)
        ]
    stems = [Path(p).stem for p in paths]
    dups = duplicated_names(stems)
    if dups:
        raise DataError(
            f"config key 'data.{key}' has two files named '{dups[0]}'; the file name "
            f"(without extension) is the site name and must be unique"
        )
    return [(stem, p, read_csv_checked(p, schema, keep=keep))
            for stem, p in zip(stems, paths, strict=True)]


def load_csv_sites(cfg: DataConfig) -> tuple[DataSpec, list[SiteSplit]]:
    """One site per file (or per site-column value), each in train / validation / test."""
    if not cfg.csv_schema:
        raise DataError("config key 'data.csv_schema' is empty; give the schema YAML file")
    if not cfg.csv_paths:
        raise DataError("config key 'data.csv_paths' is empty; list one CSV file per site")
    if cfg.test_paths and cfg.split_column:
        raise DataError("config keys 'data.test_paths' and 'data.split_column' both give test "
                        "rows; use one of them")
    if cfg.test_paths and not cfg.site_column and len(cfg.test_paths) != len(cfg.csv_paths):
        raise DataError(
            f"config key 'data.test_paths' lists {len(cfg.test_paths)} files but "
            f"'data.csv_paths' lists {len(cfg.csv_paths)}; give one test file per site file, "
            "in the same order"
        )
    schema = load_schema(cfg.csv_schema)
    frames = _frames(cfg, cfg.csv_paths, "csv_paths", schema)
    tests: dict[str, pd.DataFrame] = {}
    if cfg.test_paths:
        test_frames = _frames(cfg, cfg.test_paths, "test_paths", schema)
        if cfg.site_column:
            tests = {name: df for name, _, df in test_frames}
            unknown = sorted(set(tests) - {name for name, _, _ in frames})
            if unknown:
                raise DataError(f"{cfg.test_paths[0]}: site '{unknown[0]}' has test rows but "
                                "no training rows")
        else:
            tests = {name: df for (name, _, _), (_, _, df)
                     in zip(frames, test_frames, strict=True)}
    sites = [site_from_frames(name, where, df, tests.get(name) if cfg.test_paths else None,
                              schema, cfg)
             for name, where, df in frames]
    missing_test = [s.name for s in sites if cfg.test_paths and s.name not in tests]
    if missing_test:
        raise DataError(f"site '{missing_test[0]}' has no rows in the test file(s) of "
                        "'data.test_paths'")
    names = tuple(schema.feature_names())
    return DataSpec("tabular", (len(names),), 2, schema.labels, names, schema), sites
