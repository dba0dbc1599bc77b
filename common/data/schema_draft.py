"""`medfed schema`: draft a schema from hospital CSVs for a person to review.

It infers what the files show (numeric, binary or categorical columns, ranges widened a
little beyond what was observed, label values) and says what it cannot know: text columns,
the meaning of the label's codes, zeros that may stand for "not measured", columns with
missing cells. Nothing is guessed silently: every inference and every open question is
returned as a line for the user, and the YAML written carries the open questions as comments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from common.data.csv_source import read_csv_frame
from common.data.schema import FLOAT32_MAX, DataError, Schema, bad_rows, row_count

# integer columns with at most this many codes, all between 0 and MAX_CODE, are drafted as
# categorical (codes like cp 1-4); anything else integer is a number (age, counts of visits)
MAX_CATEGORIES = 5
MAX_CODE = 10
# a text column with at most this many distinct values is drafted as categorical (sex F/M,
# smoker yes/no); more looks like free text or identifiers
MAX_TEXT_CATEGORIES = 12
# label texts that usually mean "no disease": drafted as the negative class (still a question)
NEGATIVE_WORDS = {"no", "n", "false", "negative", "neg", "healthy", "benign", "normal",
                  "absent", "none", "control"}
WIDEN = 0.25  # ranges are widened by this share of the observed span on each side


@dataclass
class Draft:
    """The drafted schema (as a dict), what was inferred, and what needs a decision."""

    schema: dict[str, object]
    inferred: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        """Readable YAML: one flow mapping per column; open questions as comments."""
        lines = ["# Drafted by `medfed schema`: review every line before use.",
                 "# Types, ranges and label codes were inferred from the data files; ranges",
                 "# are the observed ones widened a little. Open questions:"]
        lines += [f"#  - {d}" for d in self.decisions] or ["#  (none)"]
        s = self.schema
        lines += [f"label: {_yaml_text(str(s['label']))}",
                  f"positive: {_codes(s['positive'])}",  # type: ignore[arg-type]
                  f"negative: {_codes(s['negative'])}",  # type: ignore[arg-type]
                  f"labels: [{', '.join(_yaml_text(v) for v in s['labels'])}]",  # type: ignore[attr-defined]
                  "columns:"]
        for col in s["columns"]:  # type: ignore[attr-defined]
            parts = [f"{k}: {_value(v)}" for k, v in col.items()]
            lines.append("  - {" + ", ".join(parts) + "}")
        return "\n".join(lines) + "\n"


def _yaml_text(text: str) -> str:
    """`text` as a one-line double-quoted YAML scalar that reads back as `text`: the emitter
    escapes newlines, tabs and control characters, which a YAML reader would otherwise fold
    into spaces or refuse (a quoted CSV cell can hold them)."""
    return yaml.safe_dump(text, default_style='"', allow_unicode=True,
                          width=math.inf).rstrip("\n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _codes(values: list[float] | list[str]) -> str:
    return "[" + ", ".join(_yaml_text(v) if isinstance(v, str) else _num(v)
                           for v in values) + "]"


def _quoted(values: list[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return _num(float(v))
    if isinstance(v, list):
        return _codes(v)
    return _yaml_text(str(v))


def _nice(value: float, down: bool) -> float:
    """Round a range bound outward to 2 significant figures."""
    if value == 0:
        return 0.0
    step = 10 ** (math.floor(math.log10(abs(value))) - 1)
    return float((math.floor if down else math.ceil)(value / step) * step)


def _frames(paths: list[Path]) -> list[pd.DataFrame]:
    """Each file's cells, rows indexed by their spreadsheet row numbers (for messages)."""
    frames = [read_csv_frame(Path(path)) for path in paths]
    for path, df in zip(paths, frames, strict=True):
        if df.empty:  # nothing to infer a type or a label code from
            raise DataError(f"{path}: the file has a header but no data rows")
    columns = list(frames[0].columns)
    for path, df in zip(paths[1:], frames[1:], strict=True):
        if list(df.columns) != columns:
            raise DataError(f"{path}: columns differ from those of {paths[0]}; every file of "
                            "a federation must have the same columns")
    return frames


def _refuse_unstorable(name: str, paths: list[Path], frames: list[pd.DataFrame]) -> None:
    """Refuse the first file whose column `name` holds inf or a number beyond float32 (the
    encoded features' type): no range can be drafted around it, and no file holding it would
    pass the check it drafts."""
    for path, df in zip(paths, frames, strict=True):
        values = pd.to_numeric(df[name], errors="coerce")
        bad = values.notna() & ~(values.abs() <= FLOAT32_MAX)
        if bad.any():
            raise DataError(f"{path}: column '{name}' has {bad_rows(bad)} with a value that is "
                            f"infinite or beyond ±{FLOAT32_MAX:.1e}, which medfed cannot store; "
                            "correct those rows")


def _text_column(name: str, raw: pd.Series, draft: Draft) -> dict[str, object] | None:
    """A column whose cells are all text: categorical with its texts as codes when they are
    few, else left out."""
    texts = raw.dropna().str.strip()
    distinct = sorted(texts.unique())
    if len(distinct) > MAX_TEXT_CATEGORIES:
        draft.decisions.append(
            f"column '{name}' holds text with {len(distinct)} distinct values (free text or "
            f"identifiers?): left out; a categorical column has at most "
            f"{MAX_TEXT_CATEGORIES} codes here")
        return None
    if len(distinct) < 2:
        draft.decisions.append(f"column '{name}' holds a single text value: left out")
        return None
    col: dict[str, object] = {"name": name, "type": "categorical", "categories": distinct}
    draft.inferred.append(f"{name}: categorical with text codes {_quoted(distinct)} (the first "
                          "is the reference level)")
    folded: dict[str, list[str]] = {}
    for value in distinct:
        folded.setdefault(value.casefold(), []).append(value)
    variants = [v for v in folded.values() if len(v) > 1]
    if variants:
        draft.decisions.append(
            f"column '{name}' has codes that differ only in case ({_quoted(variants[0])}): "
            "each is a category of its own; recode them to one spelling if they mean the same")
    return _with_missing_policy(col, int(raw.isna().sum()), draft)


def _column(name: str, raw: pd.Series, draft: Draft, paths: list[Path],
            frames: list[pd.DataFrame]) -> dict[str, object] | None:
    """A feature column drafted from its cells in all files (`raw`); `paths` and `frames`
    (each file's own rows) name where a value is refused."""
    values = pd.to_numeric(raw, errors="coerce")
    text = raw.notna() & values.isna()
    if text.any() and text.sum() == raw.notna().sum():
        return _text_column(name, raw, draft)
    if text.any():
        draft.decisions.append(
            f"column '{name}' holds numbers and, in {row_count(int(text.sum()))}, text "
            f"({raw[text].nunique()} distinct values): left out; correct those rows, or, if "
            "the text means 'not measured', add it to missing_values (e.g. missing_values: "
            "[\"not done\"]) with a missing policy")
        return None
    observed = values.dropna().to_numpy(dtype=np.float64)
    missing = int(values.isna().sum())
    if len(observed) == 0:
        draft.decisions.append(f"column '{name}' has no value in any row: left out")
        return None
    if not np.all(np.abs(observed) <= FLOAT32_MAX):
        _refuse_unstorable(name, paths, frames)
    distinct = np.unique(observed)
    col: dict[str, object] = {"name": name}
    integral = bool(np.all(np.mod(observed, 1) == 0))
    if len(distinct) == 1:
        # one value in every row tells the model nothing: as a code it cannot be categorical
        # (that needs two), as a number its drafted range would be that value alone and refuse
        # the next hospital's first other reading
        draft.decisions.append(f"column '{name}' holds a single value ({_num(distinct[0])}) "
                               "in every row: left out")
        return None
    if set(distinct.tolist()) <= {0.0, 1.0}:
        col["type"] = "binary"
        draft.inferred.append(f"{name}: binary (values 0/1)")
    elif integral and len(distinct) <= MAX_CATEGORIES and 0 <= distinct[0] \
            and distinct[-1] <= MAX_CODE:
        col["type"] = "categorical"
        col["categories"] = [float(v) for v in distinct]
        draft.inferred.append(
            f"{name}: categorical with codes {', '.join(_num(v) for v in distinct)} (the "
            f"first is the reference level); if it is a count or an ordered grade, make it "
            "numeric")
    else:
        lo, hi = float(distinct[0]), float(distinct[-1])
        span = hi - lo
        low = lo - WIDEN * span
        col["type"] = "numeric"
        # strictly positive data (ages, pressures) stays >= 0; data reaching 0 may go below
        col["min"] = _nice(0.0 if lo > 0 > low else low, down=True)
        col["max"] = _nice(hi + WIDEN * span, down=False)
        draft.inferred.append(f"{name}: numeric, observed {_num(lo)} to {_num(hi)}, allowed "
                              f"{_num(col['min'])} to {_num(col['max'])}")  # type: ignore[arg-type]
        zeros = int(np.sum(observed == 0))
        positive = observed[observed > 0]
        if zeros and len(positive) and positive.min() > 0.1 * hi:
            draft.decisions.append(
                f"column '{name}' has {zeros} zero{'s' if zeros > 1 else ''} while its other "
                f"values are at least "
                f"{_num(float(positive.min()))}: if 0 means 'not measured', add "
                "missing_values: [0] and a missing policy")
    return _with_missing_policy(col, missing, draft)


def _with_missing_policy(col: dict[str, object], missing: int, draft: Draft
                         ) -> dict[str, object]:
    """`col` with a drafted policy for its `missing` empty cells (a question for the user)."""
    if missing:
        policy = "median" if col["type"] == "numeric" else "most_frequent"
        col["missing"] = policy
        draft.decisions.append(
            f"column '{col['name']}' has {missing} missing cell{'s' if missing > 1 else ''}: "
            f"drafted 'missing: {policy}' (fitted on each site's training split); use "
            "'refuse' to reject such rows, or add missing_indicator: true")
    return col


def draft_schema(paths: list[Path], label: str, ignore: tuple[str, ...] = ()) -> Draft:
    """Draft a schema from `paths` whose label column is `label`.

    `ignore` names columns that are not features (a site or split column).
    """
    if not paths:
        raise DataError("--data needs at least one CSV file")
    frames = _frames(paths)
    df = pd.concat(frames, ignore_index=True)
    if label not in df.columns:
        raise DataError(f"{paths[0]}: label column '{label}' not found (columns: "
                        f"{', '.join(list(df.columns)[:20])})")
    absent = [c for c in ignore if c not in df.columns]
    if absent:
        raise DataError(f"{paths[0]}: column '{absent[0]}' not found")
    draft = Draft(schema={})
    raw = df[label]
    y = pd.to_numeric(raw, errors="coerce")
    text = int(y.isna().sum())
    _check_label_per_file(label, paths, frames, mixed=0 < text < len(y))
    _refuse_unstorable(label, paths, frames)  # a code the drafted schema could not hold
    negative, positive, labels = (_text_label(label, raw, draft) if text
                                  else _numeric_label(label, y, draft))
    shown = [_num(v) if isinstance(v, float) else repr(v) for v in (*negative, *positive)]
    n_positive = int((raw.str.strip() if text else y).isin(positive).sum())
    draft.inferred.append(f"label {label}: negative {', '.join(shown[:len(negative)])}, "
                          f"positive {', '.join(shown[len(negative):])} ({n_positive} of "
                          f"{len(y)} rows positive)")
    columns = [c for c in (_column(name, df[name], draft, paths, frames) for name in df.columns
                           if name != label and name not in ignore) if c is not None]
    if not columns:
        raise DataError("no column could be drafted as a feature (see the notes above)")
    draft.schema = {"label": label, "positive": positive, "negative": negative,
                    "labels": labels, "columns": columns}
    Schema.from_dict(draft.schema)  # the draft must be a schema medfed reads
    return draft


def _check_label_per_file(label: str, paths: list[Path], frames: list[pd.DataFrame],
                          mixed: bool) -> None:
    """Refuse the first file with an empty label cell or, when the files' labels are `mixed`
    numbers and text, with text labels; named with its own row numbers."""
    for path, df in zip(paths, frames, strict=True):
        empty = df[label].isna()
        if empty.any():
            raise DataError(f"{path}: label column '{label}' has {bad_rows(empty)} without a "
                            "value; every training row needs a label")
    for path, df in zip(paths, frames, strict=True):
        text = df[label].notna() & pd.to_numeric(df[label], errors="coerce").isna()
        if mixed and text.any():
            others = "the other files" if text.all() else "other rows"
            raise DataError(f"{path}: label column '{label}' has {bad_rows(text)} with text "
                            f"where {others} hold numbers; write every label one way (numbers "
                            "or words)")


def _numeric_label(label: str, y: pd.Series, draft: Draft
                   ) -> tuple[list[float], list[float], list[str]]:
    """(negative, positive, class names) of a label coded in numbers: the lowest is negative."""
    codes = sorted(float(v) for v in np.unique(y.to_numpy()))
    if len(codes) < 2:
        raise DataError(f"label column '{label}' has a single value ({_num(codes[0])}) in all "
                        "files; a diagnosis model needs both classes")
    negative, positive = [codes[0]], codes[1:]
    if codes != [0.0, 1.0]:
        draft.decisions.append(
            f"label '{label}' has codes {', '.join(_num(c) for c in codes)}: drafted "
            f"{_num(codes[0])} as negative and {', '.join(_num(c) for c in positive)} as "
            "positive; check which codes mean disease")
    return negative, positive, ["negative", "positive"]


def _text_label(label: str, raw: pd.Series, draft: Draft
                ) -> tuple[list[str], list[str], list[str]]:
    """(negative, positive, class names) of a label written in text ("disease", "healthy"):
    a word that usually means no disease is negative, else the first in alphabetical order;
    either way it is a question for the user."""
    codes = sorted(raw.str.strip().unique())
    if len(codes) < 2:
        raise DataError(f"label column '{label}' has a single value ({codes[0]!r}) in all "
                        "files; a diagnosis model needs both classes")
    usual = [c for c in codes if c.casefold() in NEGATIVE_WORDS]
    negative = usual[:1] if len(usual) == 1 else codes[:1]
    positive = [c for c in codes if c not in negative]
    why = "a word that usually means no disease" if len(usual) == 1 else "alphabetical order"
    draft.decisions.append(
        f"label '{label}' is text: drafted {negative[0]!r} as negative and "
        f"{_quoted(positive)} as positive ({why}); check which values mean disease")
    names = [negative[0], positive[0]] if len(positive) == 1 else ["negative", "positive"]
    return negative, positive, names
