"""The tabular data contract: which columns a hospital file holds, their types and ranges.

A :class:`Schema` is written once (YAML, e.g. ``common/datasets/heart_disease/schema.yaml``),
stored in every bundle manifest, and used on both sides: the training path validates and
encodes each site's file with it, and ``medfed predict`` checks new files against the same
schema. Messages name the file, the column, how many rows are bad and (for a file) the first
bad rows' numbers, never the values (they may be patient data).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from common.config import safe_yaml

COLUMN_TYPES = ("numeric", "binary", "categorical")
# What to do with a missing cell: refuse the file, or fill it from the site's training split.
MISSING_POLICIES = ("refuse", "median", "mean", "most_frequent", "constant")
# Policies that make sense per column type (a median of category codes means nothing).
_POLICIES_FOR = {
    "numeric": MISSING_POLICIES,
    "binary": ("refuse", "most_frequent", "constant"),
    "categorical": ("refuse", "most_frequent", "constant"),
}
INDICATOR_SUFFIX = ":missing"  # encoded name of a missing-indicator feature, e.g. "chol:missing"
# Index name of a frame read from a file whose index holds each row's spreadsheet row number
# (the header is row 1): messages then say which rows are bad (numbers only, never values).
ROW_INDEX = "row"
SHOWN_ROWS = 3  # row numbers a message lists before "..."
# A code as a hospital file writes it: a number (cp 1-4, num 0-4) or text (sex F/M, "disease").
Code = float | str
# The encoded value of a text cell that names none of its column's categories (codes are the
# categories' positions, 0..k-1): "present but not allowed", which the category check refuses.
UNKNOWN_TEXT = -1.0
# cells a hospital file leaves "not measured" in any column (the CSV reader reads them as
# missing); no text code can be one of them
MISSING_MARKERS = ("", "NA", "NaN", "nan", "?")
# the largest magnitude a feature can have: encoded features are float32, in which anything
# larger is inf (a site's mean would be inf, its normalised rows NaN)
FLOAT32_MAX = float(np.finfo(np.float32).max)


class DataError(ValueError):
    """Bad data or schema; one sentence naming the file, column or key and a row count."""


@dataclass(frozen=True)
class Column:
    """One input column: its type, unit and allowed values."""

    name: str
    type: str  # numeric | binary | categorical
    unit: str = ""
    min: float | None = None
    max: float | None = None
    # categorical: allowed codes; the first one is the reference level dropped by one-hot.
    # A column coded in text (sex: F, M) holds the positions 0..k-1 here and the texts in
    # `category_names`; cells are matched to those texts exactly (surrounding spaces aside).
    categories: tuple[float, ...] = ()
    missing: str | None = None  # policy for missing cells; None: the schema's default
    fill_value: float | None = None  # the value `missing: constant` fills in
    # codes that mean "not measured": numbers (chol 0) or words ("unknown", "not done")
    missing_values: tuple[Code, ...] = ()
    missing_indicator: bool = False  # add a 0/1 feature "<name>:missing"
    category_names: tuple[str, ...] = ()

    def written_codes(self) -> tuple[Code, ...]:
        """The categories as the file writes them: words, else numbers."""
        return self.category_names or self.categories

    def category(self, code: float) -> str:
        """How a category is written in the file: its text, else its number."""
        return self.category_names[int(code)] if self.category_names else _code(code)


_OPTIONAL_FIELDS = tuple(f for f in dataclasses.fields(Column)
                         if f.name not in ("name", "type", "category_names"))


@dataclass(frozen=True)
class Schema:
    """Feature columns plus a binary label column mapped from raw codes to 0/1."""

    columns: tuple[Column, ...]
    label: str
    positive: tuple[Code, ...]  # all numbers, or all text ("disease")
    negative: tuple[Code, ...]
    labels: tuple[str, str] = ("negative", "positive")  # display names of classes 0 and 1
    missing: str = "refuse"  # default policy for columns that do not name their own

    def policy(self, col: Column) -> str:
        """The missing-value policy of `col`: its own, else the schema default.

        A default of ``median`` or ``mean`` applies to numeric columns; binary and
        categorical columns then use ``most_frequent`` (documented in docs/own-data.md).
        """
        if col.missing is not None:
            return col.missing
        if self.missing in ("median", "mean") and col.type != "numeric":
            return "most_frequent"
        return self.missing

    def feature_names(self) -> list[str]:
        """Encoded feature names, ordered like ``pandas.get_dummies(drop_first=True)``.

        Numeric and binary columns keep their order; one-hot blocks (``"cp=2"``) follow in
        column order, each without its first category; missing indicators (``"chol:missing"``)
        come last. Without indicators this reproduces FLamby's heart order.
        """
        return [name for name, _, _ in self.encoded_columns()]

    def encoded_columns(self) -> list[tuple[str, Column, float | None]]:
        """(feature name, source column, dummy code or None) for each encoded feature.

        The code is the category a one-hot feature stands for; None for a plain value or a
        missing indicator (whose name ends with :data:`INDICATOR_SUFFIX`).
        """
        out: list[tuple[str, Column, float | None]] = [
            (c.name, c, None) for c in self.columns if c.type != "categorical"]
        out += [(f"{c.name}={c.category(v)}", c, v)
                for c in self.columns if c.type == "categorical" for v in c.categories[1:]]
        out += [(c.name + INDICATOR_SUFFIX, c, None) for c in self.columns if c.missing_indicator]
        return out

    def column(self, name: str) -> Column:
        """The column called `name` (KeyError if absent)."""
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)

    def without(self, names: tuple[str, ...] | list[str]) -> Schema:
        """A copy without the named feature columns."""
        kept = tuple(c for c in self.columns if c.name not in set(names))
        return Schema(kept, self.label, self.positive, self.negative, self.labels, self.missing)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the manifest stores this)."""
        cols = []
        for c in self.columns:
            d: dict[str, Any] = {"name": c.name, "type": c.type}
            for f in _OPTIONAL_FIELDS:  # only what differs from the default
                value = getattr(c, f.name)
                if value != f.default:
                    d[f.name] = list(value) if isinstance(value, tuple) else value
            if c.category_names:  # written as the file writes them
                d["categories"] = list(c.written_codes())
                if c.fill_value is not None:
                    d["fill_value"] = c.category(c.fill_value)
            cols.append(d)
        out: dict[str, Any] = {
            "columns": cols,
            "label": self.label,
            "positive": list(self.positive),
            "negative": list(self.negative),
            "labels": list(self.labels),
        }
        if self.missing != "refuse":
            out["missing"] = self.missing
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Schema:
        """Build and check a schema from :meth:`to_dict` output or parsed YAML."""
        return _schema_from_dict(d)


def _code(v: Code) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v)


# ---------------------------------------------------------------- parsing the schema file


_COLUMN_KEYS = {"name", "type", "unit", "min", "max", "categories", "missing", "fill_value",
                "missing_values", "missing_indicator"}
_SCHEMA_KEYS = {"columns", "label", "positive", "negative", "labels", "missing"}


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"schema key '{key}' must be a finite number, got {value!r}")
    return float(value)


def _numbers(value: Any, key: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple):
        raise DataError(f"schema key '{key}' must be a list of numbers, got {value!r}")
    return tuple(_number(v, f"{key}[{i}]") for i, v in enumerate(value))


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"schema key '{key}' must be a non-empty string, got {value!r}")
    return value


def _codes(value: Any, key: str) -> tuple[Code, ...]:
    """A list of codes: all numbers, or all texts as a file writes them (spaces around a text
    are not part of it; a text a CSV reader takes for a missing cell cannot be a code)."""
    if not isinstance(value, list | tuple):
        raise DataError(f"schema key '{key}' must be a list of codes, got {value!r}")
    if any(isinstance(v, bool) for v in value):
        raise DataError(f"schema key '{key}' holds true/false: YAML reads unquoted yes, no, "
                        "true, false, on and off that way; quote text codes (\"no\", \"yes\")")
    if not any(isinstance(v, str) for v in value):
        return _numbers(value, key)
    texts = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise DataError(f"schema key '{key}' mixes numbers and text ({value!r}); quote "
                            "every code or none")
        if v.strip() in MISSING_MARKERS:
            raise DataError(f"schema key '{key}[{i}]' is {v!r}, which a CSV file reads as a "
                            "missing cell")
        texts.append(v.strip())
    return tuple(texts)


def _column_from_dict(d: Any, key: str) -> Column:
    if not isinstance(d, dict):
        raise DataError(f"schema key '{key}' must be a mapping, got {d!r}")
    for k in d:
        if k not in _COLUMN_KEYS:
            raise DataError(f"unknown schema key '{key}.{k}' (known: {sorted(_COLUMN_KEYS)})")
    for k in ("name", "type"):
        if k not in d:
            raise DataError(f"schema key '{key}.{k}' is missing")
    name = _text(d["name"], f"{key}.name")
    ctype = _text(d["type"], f"{key}.type")
    if ctype not in COLUMN_TYPES:
        raise DataError(f"schema key '{key}.type' must be one of {COLUMN_TYPES}, got {ctype!r}")
    unit = d.get("unit", "")
    if not isinstance(unit, str):
        raise DataError(f"schema key '{key}.unit' must be a string, got {unit!r}")
    lo = None if d.get("min") is None else _number(d["min"], f"{key}.min")
    hi = None if d.get("max") is None else _number(d["max"], f"{key}.max")
    if lo is not None and hi is not None and lo > hi:
        raise DataError(f"schema key '{key}': min must not exceed max")
    codes = _codes(d.get("categories", []), f"{key}.categories")
    names = tuple(str(c) for c in codes) if codes and isinstance(codes[0], str) else ()
    cats = tuple(float(i) for i in range(len(codes))) if names else tuple(map(float, codes))
    if ctype == "categorical" and len(cats) < 2:
        raise DataError(f"schema key '{key}.categories' needs at least two codes")
    if ctype != "categorical" and cats:
        raise DataError(f"schema key '{key}.categories' is only allowed for categorical columns")
    if len(set(codes)) != len(codes):
        raise DataError(f"schema key '{key}.categories' lists a code twice")
    missing = d.get("missing")
    if missing is not None:
        missing = _text(missing, f"{key}.missing")
        allowed = _POLICIES_FOR[ctype]
        if missing not in allowed:
            raise DataError(
                f"schema key '{key}.missing' of {ctype} column '{name}' must be one of "
                f"{', '.join(allowed)}, got {missing!r}"
            )
    fill = _fill_value(d.get("fill_value"), names, f"{key}.fill_value")
    if missing == "constant" and fill is None:
        raise DataError(f"schema key '{key}.fill_value' is needed with 'missing: constant'")
    if fill is not None and missing != "constant":
        raise DataError(f"schema key '{key}.fill_value' is only used with 'missing: constant'")
    if fill is not None:
        if ctype == "binary" and fill not in (0.0, 1.0):
            raise DataError(f"schema key '{key}.fill_value' of binary column '{name}' must be "
                            "0 or 1")
        if ctype == "categorical" and fill not in cats:
            raise DataError(f"schema key '{key}.fill_value' must be one of the categories of "
                            f"'{name}'")
    absent = _codes(d.get("missing_values", []), f"{key}.missing_values")
    if names and absent and not isinstance(absent[0], str):
        raise DataError(f"schema key '{key}.missing_values' must be text like the column's "
                        "categories (quote a number: \"99\")")
    if set(absent) & set(names):
        raise DataError(f"schema key '{key}.missing_values' lists a code that is also one of "
                        f"the categories of '{name}'")
    indicator = d.get("missing_indicator", False)
    if not isinstance(indicator, bool):
        raise DataError(f"schema key '{key}.missing_indicator' must be true or false")
    return Column(name, ctype, unit, lo, hi, cats, missing, fill, absent, indicator, names)


def _fill_value(value: Any, names: tuple[str, ...], key: str) -> float | None:
    """The constant fill as the column's code (a text category: its position)."""
    if value is None:
        return None
    if not names:
        return _number(value, key)
    if not isinstance(value, str) or value.strip() not in names:
        raise DataError(f"schema key '{key}' must be one of the categories "
                        f"{', '.join(map(repr, names))}, got {value!r}")
    return float(names.index(value.strip()))


def _schema_from_dict(d: Any) -> Schema:
    if not isinstance(d, dict):
        raise DataError("a schema must be a mapping with keys columns, label, positive, negative")
    for k in d:
        if k not in _SCHEMA_KEYS:
            raise DataError(f"unknown schema key '{k}' (known: {sorted(_SCHEMA_KEYS)})")
    for k in ("columns", "label", "positive", "negative"):
        if k not in d:
            raise DataError(f"schema key '{k}' is missing")
    if not isinstance(d["columns"], list | tuple) or not d["columns"]:
        raise DataError("schema key 'columns' must be a non-empty list")
    label = _text(d["label"], "label")
    for i, c in enumerate(d["columns"]):
        if isinstance(c, dict) and c.get("name") == label and "missing" in c:
            raise DataError(
                f"schema key 'columns[{i}].missing': '{label}' is the label column, which "
                "cannot be imputed (rows without a label are refused); remove it from 'columns'"
            )
    columns = tuple(_column_from_dict(c, f"columns[{i}]") for i, c in enumerate(d["columns"]))
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise DataError("schema key 'columns' names a column twice")
    if label in names:
        raise DataError(f"schema key 'label': the label column '{label}' is also a feature")
    default = _text(d.get("missing", "refuse"), "missing")
    defaults = tuple(p for p in MISSING_POLICIES if p != "constant")  # constants are per column
    if default not in defaults:
        raise DataError(f"schema key 'missing' must be one of {', '.join(defaults)} (a constant "
                        f"fill is set per column with fill_value), got {default!r}")
    positive, negative = _codes(d["positive"], "positive"), _codes(d["negative"], "negative")
    if not positive or not negative or set(positive) & set(negative):
        raise DataError("schema keys 'positive' and 'negative' must be non-empty and disjoint")
    if isinstance(positive[0], str) != isinstance(negative[0], str):
        raise DataError("schema keys 'positive' and 'negative' must both be numbers or both "
                        f"text, got {list(positive)!r} and {list(negative)!r}")
    labels = d.get("labels", ["negative", "positive"])
    if not isinstance(labels, list | tuple) or len(labels) != 2:
        raise DataError(f"schema key 'labels' must be two class names, got {labels!r}")
    labels = (_text(labels[0], "labels[0]"), _text(labels[1], "labels[1]"))
    return Schema(columns, label, positive, negative, labels, default)


def load_schema(path: str | Path) -> Schema:
    """Read a schema YAML file; any problem raises :class:`DataError` naming the file and key."""
    path = Path(path)
    try:
        raw = safe_yaml(path.read_text(encoding="utf-8"), f"schema file {path}")
    except FileNotFoundError as err:
        raise DataError(f"schema file {path} does not exist") from err
    except UnicodeDecodeError as err:
        raise DataError(f"schema file {path} is not UTF-8 text") from err
    except yaml.YAMLError as err:
        raise DataError(f"schema file {path} is not valid YAML") from err
    except ValueError as err:
        raise DataError(str(err)) from err
    try:
        return Schema.from_dict(raw)
    except DataError as err:
        raise DataError(f"schema file {path}: {err}") from err


# ------------------------------------------------------------------ checking a data frame


# a number written with a decimal comma, as spreadsheets in many locales do: "1,5", "-0,25"
DECIMAL_COMMA = r"\s*[-+]?\d+,\d+\s*"
# what a spreadsheet writes for a formula that failed (#N/A, #DIV/0!, #VALUE!, #REF!, #NAME?)
SPREADSHEET_ERROR = r"#[A-Z][A-Z/0]*[!?]?"


def _numeric(series: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(series):
        return series.astype("float64")
    if pd.api.types.is_numeric_dtype(series):
        return series.astype("float64")
    return pd.to_numeric(series.astype("object"), errors="coerce").astype("float64")


def _text_cells(raw: pd.Series) -> pd.Series:
    """Cells as text without surrounding spaces (missing cells stay missing)."""
    return raw.astype("object").where(raw.notna()).map(
        lambda v: v.strip() if isinstance(v, str) else v)


def _column_values(raw: pd.Series, col: Column) -> pd.Series:
    """A column's cells as float codes: numbers as read, a text category as its position
    (:data:`UNKNOWN_TEXT` for text naming no category), its "not measured" codes as NaN."""
    if not col.category_names:
        return _as_missing(_numeric(raw), col)
    text = _text_cells(raw)
    codes = text.map({name: float(i) for i, name in enumerate(col.category_names)})
    codes = codes.astype("float64")
    unknown = text.notna() & codes.isna() & ~text.isin(col.missing_values)
    return codes.mask(unknown, UNKNOWN_TEXT)


def row_count(n: int) -> str:
    """"1 row", "4 rows"."""
    return f"{n} row" if n == 1 else f"{n} rows"


def bad_rows(bad: pd.Series) -> str:
    """'1 row (row 5)', '4 rows (rows 5, 9, 12, ...)': a count, with the first row numbers when
    the frame was read from a file (index :data:`ROW_INDEX`)."""
    n = int(bad.sum())
    if bad.index.name != ROW_INDEX:
        return row_count(n)
    shown = [str(r) for r in bad.index[bad.to_numpy(dtype=bool)][:SHOWN_ROWS]]
    more = ", ..." if n > SHOWN_ROWS else ""
    return f"{row_count(n)} ({'row' if n == 1 else 'rows'} {', '.join(shown)}{more})"


def _as_missing(values: pd.Series, col: Column) -> pd.Series:
    """`values` with the column's "not measured" codes turned into NaN."""
    if not col.missing_values:
        return values
    return values.mask(values.isin(col.missing_values))


def _check_values(raw: pd.Series, col: Column, policy: str, where: str) -> None:
    if col.category_names:  # text naming no category is refused below, as a code outside
        values = _column_values(raw, col)
    else:
        numbers = _numeric(raw)
        bad = numbers.isna() & raw.notna()
        words = [v for v in col.missing_values if isinstance(v, str)]
        if bad.any() and words:  # words meaning "not measured" are missing, not bad numbers
            bad &= ~_text_cells(raw).isin(words)
        if bad.any():
            cells = raw[bad].astype(str).str.strip()
            if cells.str.fullmatch(DECIMAL_COMMA).all():
                hint = " (decimal commas? write 1.5, not 1,5)"
            elif cells.str.fullmatch(SPREADSHEET_ERROR).all():
                hint = (f" (spreadsheet errors such as {cells.iloc[0]}: fix the formula, or list "
                        "the value in 'missing_values' if it means not measured)")
            else:
                hint = ""
            raise DataError(f"{where}: column '{col.name}' has {bad_rows(bad)} with text "
                            f"where a number is expected{hint}")
        values = _as_missing(numbers, col)
    bad = values.isna()
    if bad.any() and policy == "refuse":
        raise DataError(
            f"{where}: column '{col.name}' has {bad_rows(bad)} with missing values (the "
            f"schema refuses them; set 'missing:' for this column to impute from the training "
            f"split)"
        )
    present = values.notna()
    bad = present & ~np.isfinite(values.fillna(0.0))
    if bad.any():
        raise DataError(f"{where}: column '{col.name}' has {bad_rows(bad)} with infinite values")
    bad = present & (values.abs() > FLOAT32_MAX)
    if bad.any():
        raise DataError(f"{where}: column '{col.name}' has {bad_rows(bad)} with a value beyond "
                        f"±{FLOAT32_MAX:.1e}, too large for medfed to store")
    if col.type == "binary":
        bad = present & ~values.isin((0.0, 1.0))
        if bad.any():
            raise DataError(f"{where}: column '{col.name}' has {bad_rows(bad)} with a value other "
                            "than 0 or 1")
    elif col.type == "categorical":
        bad = present & ~values.isin(col.categories)
        if bad.any():
            allowed = ", ".join(_code(c) for c in col.written_codes())
            raise DataError(
                f"{where}: column '{col.name}' has {bad_rows(bad)} with a code outside "
                f"({allowed}){_case_hint(raw[bad], col)}"
            )
    lo = -np.inf if col.min is None else col.min
    hi = np.inf if col.max is None else col.max
    bad = present & ((values < lo) | (values > hi))
    if bad.any():
        raise DataError(
            f"{where}: column '{col.name}' has {bad_rows(bad)} outside the allowed range "
            f"[{_code(lo)}, {_code(hi)}]"
        )


def _label_values(raw: pd.Series, schema: Schema) -> pd.Series:
    """The label cells as the schema's codes are written: numbers, or text without spaces."""
    return _text_cells(raw) if isinstance(schema.positive[0], str) else _numeric(raw)


def _case_hint(cells: pd.Series, col: Column) -> str:
    """A hint when every refused text differs from a category only in case or spacing."""
    folded = {name.casefold() for name in col.category_names}
    if folded and _text_cells(cells).str.casefold().isin(folded).all():
        return " (text codes must match the schema's exactly, upper and lower case included)"
    return ""


def _check_label(raw: pd.Series, schema: Schema, where: str, require_label: bool) -> None:
    """Label cells must hold the schema's codes. An empty cell is an outcome not known yet:
    refused where the label is needed (training, evaluation), left alone for prediction."""
    values = _label_values(raw, schema)
    empty = raw.isna()
    if require_label and empty.any():
        raise DataError(f"{where}: label column '{schema.label}' has {bad_rows(empty)} without "
                        "a label (empty, NA or ?); every row to train or evaluate on needs its "
                        "outcome")
    bad = ~values.isin(schema.positive + schema.negative) & ~empty  # text counts as bad
    if bad.any():
        pos = ", ".join(_code(v) for v in schema.positive)
        neg = ", ".join(_code(v) for v in schema.negative)
        raise DataError(
            f"{where}: label column '{schema.label}' has {bad_rows(bad)} with a value neither "
            f"positive ({pos}) nor negative ({neg})"
        )


def _near_miss(name: str, header: list[str]) -> str:
    """' (the file has 'Age': names must match exactly)' for a header entry that differs from
    `name` only in case, spaces, '-' or '_', or that adds a unit or note after it."""
    def key(s: str) -> str:
        return "".join(ch for ch in s.casefold() if ch not in " -_")

    near = ([found for found in header if key(found) == key(name)]
            # else a unit or note after the name: 'chol (mg/dl)', 'age_years'
            or [found for found in header if key(found).startswith(key(name))
                and found[len(name):len(name) + 1] in " ([_-"])
    return f" (the file has {near[0]!r}: names must match exactly)" if near else ""


def validate_frame(
    df: pd.DataFrame, schema: Schema, where: str, require_label: bool = True
) -> None:
    """Check a frame against `schema`; raise :class:`DataError` at the first problem.

    Checks duplicated and missing/extra column names, emptiness, text in numeric columns,
    missing and infinite values, binary 0/1, categorical codes, ranges and label codes.
    `where` (usually the file path) starts every message.
    """
    header = [str(c) for c in df.columns]
    dups = duplicated_names(header)
    if dups:
        raise DataError(f"{where}: column '{dups[0]}' appears more than once in the header")
    expected = [c.name for c in schema.columns]
    allowed = set(expected) | {schema.label}
    missing = [c for c in expected if c not in header]
    if require_label and schema.label not in header:
        missing.append(schema.label)
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}"
                        f"{_near_miss(missing[0], header)}")
    extra = [c for c in header if c not in allowed]
    if extra:
        raise DataError(
            f"{where}: unexpected column(s) {', '.join(repr(c) for c in extra)} "
            f"(the schema lists {len(allowed)} columns)"
        )
    if len(df) == 0:
        raise DataError(f"{where}: the file has a header but no data rows")
    for col in schema.columns:
        _check_values(df[col.name], col, schema.policy(col), where)
    if schema.label in header:
        _check_label(df[schema.label], schema, where, require_label)


def duplicated_names(names: list[str]) -> list[str]:
    """Names that occur more than once, sorted (linear in the number of names)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def encode(df: pd.DataFrame, schema: Schema, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate, then encode into float32 X (N, F) and int64 y (None without a label column,
    or when some label cells are empty: outcomes not known yet, as in a file to predict).

    Categorical columns are one-hot encoded (first category dropped); a missing cell (allowed
    by the column's policy) is NaN in its value column, or in every column of its one-hot
    block, and sets the column's missing indicator. :class:`common.data.preprocess.SiteStats`
    fills the NaNs from the site's training split.
    """
    validate_frame(df, schema, where, require_label=False)
    values = {c.name: _column_values(df[c.name], c).to_numpy() for c in schema.columns}
    blocks: list[np.ndarray] = []
    for name, col, code in schema.encoded_columns():
        v = values[col.name]
        if name.endswith(INDICATOR_SUFFIX) and name != col.name:
            blocks.append(np.isnan(v).astype(np.float64))
        elif code is not None:
            blocks.append(np.where(np.isnan(v), np.nan, (v == code).astype(np.float64)))
        else:
            blocks.append(v)
    x = np.stack(blocks, axis=1).astype(np.float32)
    y = None
    if schema.label in df.columns and df[schema.label].notna().all():  # else not all known
        y = _label_values(df[schema.label], schema).isin(schema.positive).to_numpy(np.int64)
    return x, y
