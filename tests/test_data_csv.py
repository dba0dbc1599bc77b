"""Schema files, CSV validation messages, encoding and the CSV source."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import DataConfig
from common.data import DataError, Schema, encode, load_federated, load_schema
from common.data.csv_source import load_csv_sites, read_csv_checked
from common.data.heart import SCHEMA_PATH

SCHEMA_YAML = """\
label: outcome
positive: [1]
negative: [0]
columns:
  - {name: age, type: numeric, unit: years, min: 18, max: 100}
  - {name: smoker, type: binary}
  - {name: stage, type: categorical, categories: [1, 2, 3]}
"""
HEADER = "age,smoker,stage,outcome\n"
ROWS = ["40,0,1,0", "55,1,2,1", "63,1,3,1", "70,0,2,0", "48,1,1,0", "59,0,3,1"]


@pytest.fixture()
def schema_path(tmp_path):
    path = tmp_path / "schema.yaml"
    path.write_text(SCHEMA_YAML)
    return path


def _write(tmp_path, text: str | bytes, name: str = "site.csv"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_schema_round_trips_through_json(schema_path):
    schema = load_schema(schema_path)
    assert Schema.from_dict(json.loads(json.dumps(schema.to_dict()))) == schema


def test_feature_names_drop_the_first_category(schema_path):
    assert load_schema(schema_path).feature_names() == ["age", "smoker", "stage=2", "stage=3"]


def test_heart_schema_file_loads():
    schema = load_schema(SCHEMA_PATH)
    assert schema.label == "num" and len(schema.columns) == 13


def test_unknown_schema_key_is_named(tmp_path):
    path = _write(tmp_path, SCHEMA_YAML.replace("min: 18", "minimum: 18"), "s.yaml")
    with pytest.raises(DataError, match=r"s\.yaml.*columns\[0\]\.minimum"):
        load_schema(path)


def test_wrong_schema_type_is_named(tmp_path):
    path = _write(tmp_path, SCHEMA_YAML.replace("max: 100", "max: old"), "s.yaml")
    with pytest.raises(DataError, match=r"columns\[0\]\.max"):
        load_schema(path)


def test_encode_one_hot_and_label(schema_path, tmp_path):
    schema = load_schema(schema_path)
    df = read_csv_checked(_write(tmp_path, HEADER + "40,0,1,0\n55,1,3,1\n"), schema)
    x, y = encode(df, schema, "t")
    np.testing.assert_array_equal(x, [[40, 0, 0, 0], [55, 1, 0, 1]])
    assert x.dtype == np.float32 and y.dtype == np.int64 and list(y) == [0, 1]


def test_prediction_file_without_label_encodes_to_no_y(schema_path, tmp_path):
    schema = load_schema(schema_path)
    df = read_csv_checked(
        _write(tmp_path, "stage,age,smoker\n2,40,1\n"), schema, require_label=False
    )
    x, y = encode(df, schema, "t")
    assert y is None and x.tolist() == [[40, 1, 1, 0]]


BAD_FILES = {
    "missing column": (HEADER.replace("smoker,", "") + "40,1,0\n", "smoker"),
    "extra column": ("age,smoker,stage,outcome,bmi\n40,0,1,0,22\n", "bmi"),
    "out of range": (HEADER + "40,0,1,0\n917,0,1,0\n", "age"),
    "unknown category": (HEADER + "40,0,4,0\n", "stage"),
    "non-binary value": (HEADER + "40,2,1,0\n", "smoker"),
    "non-binary label": (HEADER + "40,0,1,0\n40,0,1,7\n", "outcome"),
    "text in a number": (HEADER + "forty,0,1,0\n", "age"),
    "missing value": (HEADER + "40,,1,0\n", "smoker"),
    "duplicated header": ("age,smoker,stage,age,outcome\n40,0,1,41,0\n", "age"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_message_names_file_and_column(case, schema_path, tmp_path):
    text, column = BAD_FILES[case]
    path = _write(tmp_path, text, "ward-7.csv")
    with pytest.raises(DataError) as err:
        read_csv_checked(path, load_schema(schema_path))
    message = str(err.value)
    assert str(path) in message and f"'{column}'" in message


def test_message_counts_rows_but_hides_values(schema_path, tmp_path):
    path = _write(tmp_path, HEADER + "917,0,1,0\n40,0,1,0\n913,0,1,0\n")
    with pytest.raises(DataError, match=r"2 rows \(rows 2, 4\) outside") as err:
        read_csv_checked(path, load_schema(schema_path))
    assert "917" not in str(err.value) and "913" not in str(err.value)


def test_a_message_gives_spreadsheet_row_numbers_past_blank_lines(schema_path, tmp_path):
    # header: row 1; row 3 is blank (skipped); rows 5, 6, 7 and 8 have text in 'age'
    text = HEADER + "40,0,1,0\n\n55,1,2,1\n" + "forty,0,1,0\n" * 4
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=r"'age' has 4 rows \(rows 5, 6, 7, \.\.\.\) with text"):
        read_csv_checked(path, load_schema(schema_path))


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_every_spreadsheet_line_ending_reads_the_same_rows(ending, schema_path, tmp_path):
    # CR alone is what older Mac spreadsheet exports write
    lines = [HEADER.strip(), *ROWS]
    path = _write(tmp_path, (ending.join(lines) + ending).encode())
    x, y = encode(read_csv_checked(path, load_schema(schema_path)), load_schema(schema_path),
                  "site")
    assert len(x) == len(ROWS) and y is not None and y.tolist() == [0, 1, 1, 0, 0, 1]


def test_empty_columns_and_rows_a_spreadsheet_leaves_read_as_the_clean_file(schema_path,
                                                                             tmp_path):
    # a sheet whose cells beyond the table were once formatted saves ',,' after every row and
    # rows of commas only where rows were cleared: nothing in them, so nothing to refuse
    schema = load_schema(schema_path)
    clean = encode(read_csv_checked(_write(tmp_path, HEADER + "\n".join(ROWS) + "\n",
                                           "clean.csv"), schema), schema, "clean")
    padded = [*ROWS[:2], ",,,", *ROWS[2:], ",,,", " , ,,"]
    path = _write(tmp_path, "".join(r + ",,\n" for r in [HEADER.strip(), *padded]))
    frame = read_csv_checked(path, schema)
    assert list(frame.columns) == ["age", "smoker", "stage", "outcome"]
    assert list(frame.index) == [2, 3, 5, 6, 7, 8]  # spreadsheet rows: 4 was cleared
    x, y = encode(frame, schema, "padded")
    np.testing.assert_array_equal(x, clean[0])
    np.testing.assert_array_equal(y, clean[1])


def test_an_unnamed_column_that_holds_values_is_refused_naming_it(schema_path, tmp_path):
    rows = [r + ("," if i != 2 else ",7") for i, r in enumerate(ROWS)]
    path = _write(tmp_path, HEADER.strip() + ",\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"column 5 has no name in the header but 1 row "
                                        r"\(row 4\) hold"):
        read_csv_checked(path, load_schema(schema_path))


def test_an_empty_label_is_refused_for_training_and_left_alone_for_prediction(schema_path,
                                                                             tmp_path):
    # a file to predict may carry the outcome column with new patients' outcomes not known yet
    schema = load_schema(schema_path)
    rows = [*ROWS[:3], "70,0,2,", *ROWS[4:]]
    path = _write(tmp_path, HEADER + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"'outcome' has 1 row \(row 5\) without a label"):
        read_csv_checked(path, schema)
    frame = read_csv_checked(path, schema, require_label=False)
    x, y = encode(frame, schema, "to predict")
    assert len(x) == len(ROWS) and y is None  # no half-known labels to score against
    bad = _write(tmp_path, HEADER + "\n".join([*rows[:1], "55,1,2,7", *rows[2:]]) + "\n",
                 "bad.csv")
    with pytest.raises(DataError, match=r"'outcome' has 1 row \(row 3\) with a value neither"):
        read_csv_checked(bad, schema, require_label=False)  # a code that is not one still is


# the schema above with the codes a hospital export writes in words
TEXT_SCHEMA_YAML = """\
label: outcome
positive: [disease]
negative: [healthy]
columns:
  - {name: age, type: numeric, unit: years, min: 18, max: 100}
  - {name: smoker, type: categorical, categories: ["no", "yes"], missing_values: [unknown],
     missing: constant, fill_value: "no"}
  - {name: stage, type: categorical, categories: [I, II, III]}
"""
IN_WORDS = {"smoker": {"0": "no", "1": "yes"}, "stage": {"1": "I", "2": "II", "3": "III"},
            "outcome": {"0": "healthy", "1": "disease"}}


def _in_words(rows: list[str]) -> list[str]:
    columns = HEADER.strip().split(",")
    return [",".join(IN_WORDS.get(c, {}).get(v, v) for c, v in zip(columns, row.split(","),
                                                                    strict=True))
            for row in rows]


def test_codes_written_in_words_encode_like_numeric_codes(schema_path, tmp_path):
    numeric = load_schema(schema_path)
    text = load_schema(_write(tmp_path, TEXT_SCHEMA_YAML, "text.yaml"))
    # spaces around a word are not part of it, as a spreadsheet pads them
    worded = [r.replace(",II,", ", II ,") for r in _in_words(ROWS)]
    x_num, y_num = encode(read_csv_checked(_write(tmp_path, HEADER + "\n".join(ROWS)), numeric),
                          numeric, "n")
    x_txt, y_txt = encode(read_csv_checked(
        _write(tmp_path, HEADER + "\n".join(worded), "w.csv"), text), text, "w")
    np.testing.assert_array_equal(x_txt, x_num)
    assert y_txt is not None and y_num is not None and y_txt.tolist() == y_num.tolist()
    assert text.feature_names() == ["age", "smoker=yes", "stage=II", "stage=III"]
    assert Schema.from_dict(json.loads(json.dumps(text.to_dict()))) == text


def test_a_word_meaning_not_measured_is_filled_from_the_schema(tmp_path):
    text = load_schema(_write(tmp_path, TEXT_SCHEMA_YAML, "text.yaml"))
    path = _write(tmp_path, HEADER + "40,unknown,I,healthy\n55,yes,II,disease\n")
    x, _ = encode(read_csv_checked(path, text), text, "site")
    assert np.isnan(x[0, 1]) and x[1, 1] == 1.0  # NaN until SiteStats fills "no" (0)


def test_a_word_meaning_not_measured_in_a_numeric_column_is_missing(schema_path, tmp_path):
    schema = load_schema(_write(tmp_path, SCHEMA_YAML.replace(
        "max: 100}", 'max: 100, missing_values: ["not done"], missing: median}'), "s.yaml"))
    path = _write(tmp_path, HEADER + "40,0,1,0\nnot done,1,2,1\n")
    x, _ = encode(read_csv_checked(path, schema), schema, "site")
    assert x[0, 0] == 40 and np.isnan(x[1, 0])
    with pytest.raises(DataError, match=r"'age' has 1 row \(row 3\) with text where a number"):
        read_csv_checked(_write(tmp_path, HEADER + "40,0,1,0\nforty,1,2,1\n"), schema)


@pytest.mark.parametrize(("cell", "hint"), [("Yes", True), ("maybe", False)])
def test_a_word_that_is_no_category_is_refused_naming_the_rows(cell, hint, tmp_path):
    text = load_schema(_write(tmp_path, TEXT_SCHEMA_YAML, "text.yaml"))
    path = _write(tmp_path, HEADER + f"40,no,I,healthy\n55,{cell},II,disease\n")
    with pytest.raises(DataError, match=r"'smoker' has 1 row \(row 3\) with a code outside "
                                        r"\('no', 'yes'\)") as err:
        read_csv_checked(path, text)
    assert ("upper and lower case" in str(err.value)) is hint and cell not in str(err.value)


def test_a_label_word_that_is_neither_class_is_refused(tmp_path):
    text = load_schema(_write(tmp_path, TEXT_SCHEMA_YAML, "text.yaml"))
    path = _write(tmp_path, HEADER + "40,no,I,healthy\n55,yes,II,sick\n")
    with pytest.raises(DataError, match=r"'outcome' has 1 row \(row 3\) with a value neither "
                                        r"positive \('disease'\) nor negative \('healthy'\)"):
        read_csv_checked(path, text)


@pytest.mark.parametrize(("old", "new", "fragment"), [
    ('categories: [I, II, III]', 'categories: [I, 2, III]', "mixes numbers and text"),
    ('categories: [I, II, III]', 'categories: [I, "NA", III]', "reads as a missing cell"),
    ('categories: ["no", "yes"]', 'categories: [no, yes]', "quote text codes"),
    ("negative: [healthy]", "negative: [0]", "both be numbers or both text"),
    ('fill_value: "no"', 'fill_value: "never"', "fill_value' must be one of the categories"),
    ("missing_values: [unknown]", "missing_values: [0]", "text like the column's categories"),
    ("missing_values: [unknown]", 'missing_values: ["yes"]', "also one of the categories"),
], ids=["mixed", "missing-marker", "unquoted-yes-no", "label-kinds", "fill", "missing-kind",
        "missing-is-category"])
def test_a_schema_with_inconsistent_text_codes_is_refused(old, new, fragment, tmp_path):
    assert old in TEXT_SCHEMA_YAML
    path = _write(tmp_path, TEXT_SCHEMA_YAML.replace(old, new), "text.yaml")
    with pytest.raises(DataError, match=fragment):
        load_schema(path)


def test_empty_file_is_named(schema_path, tmp_path):
    path = _write(tmp_path, "")
    with pytest.raises(DataError, match=f"{path}.*empty"):
        read_csv_checked(path, load_schema(schema_path))


def test_header_without_rows_is_named(schema_path, tmp_path):
    path = _write(tmp_path, HEADER)
    with pytest.raises(DataError, match=f"{path}.*no data rows"):
        read_csv_checked(path, load_schema(schema_path))


def test_non_utf8_file_is_named(schema_path, tmp_path):
    path = _write(tmp_path, (HEADER + "40,0,1,0\n").encode() + "# Zürich\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{path}.*UTF-8"):
        read_csv_checked(path, load_schema(schema_path))


def _cfg(schema_path, *paths, **kw) -> DataConfig:
    return DataConfig(
        source="csv", csv_schema=str(schema_path), csv_paths=tuple(str(p) for p in paths), **kw
    )


def test_one_file_per_site_named_by_stem(schema_path, tmp_path):
    a = _write(tmp_path, HEADER + "\n".join(ROWS) + "\n", "north.csv")
    b = _write(tmp_path, HEADER + "\n".join(ROWS[:4]) + "\n", "south.csv")
    spec, sites = load_csv_sites(_cfg(schema_path, a, b, test_fraction=0.34))
    assert [s.name for s in sites] == ["north", "south"]
    # test: one row per class (stratified), then validation: one row of what is left
    assert [(len(s.y_train), len(s.y_val), len(s.y_test)) for s in sites] == [(2, 2, 2),
                                                                            (1, 1, 2)]
    assert spec.input_shape == (4,) and spec.schema is not None


def test_site_column_splits_one_file(schema_path, tmp_path):
    rows = [f"{r},{'b' if i % 2 else 'a'}" for i, r in enumerate(ROWS)]
    path = _write(tmp_path, HEADER.strip() + ",hospital\n" + "\n".join(rows) + "\n")
    _, sites = load_csv_sites(_cfg(schema_path, path, site_column="hospital"))
    assert [(s.name, sum(s.sizes().values())) for s in sites] == [("a", 3), ("b", 3)]


def test_a_site_too_small_for_three_splits_is_named(schema_path, tmp_path):
    rows = [f"{r},{'b' if i % 3 else 'a'}" for i, r in enumerate(ROWS)]
    path = _write(tmp_path, HEADER.strip() + ",hospital\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="site 'a' has 2 row"):
        load_csv_sites(_cfg(schema_path, path, site_column="hospital"))


def test_site_normalisation_ignores_the_test_rows(schema_path, tmp_path):
    rows = [f"{30 + i},{i % 2},{1 + i % 3},{(i // 2) % 2}" for i in range(30)]
    path = _write(tmp_path, HEADER + "\n".join(rows) + "\n", "h.csv")
    before = load_federated(_cfg(schema_path, path)).sites[0]
    raw = load_csv_sites(_cfg(schema_path, path))[1][0]
    test_ages = set(raw.x_test[:, 0].astype(int).tolist())
    changed = [r if int(r.split(",")[0]) not in test_ages else "99" + r[2:] for r in rows]
    path.write_text(HEADER + "\n".join(changed) + "\n")
    after = load_federated(_cfg(schema_path, path)).sites[0]
    np.testing.assert_array_equal(before.x_train, after.x_train)
    assert not np.array_equal(before.x_test, after.x_test)


def test_a_split_column_says_which_rows_are_train_validation_and_test(schema_path, tmp_path):
    marks = ["train", "train", "validation", "test", "train", "test"]
    rows = [f"{r},{m}" for r, m in zip(ROWS, marks, strict=True)]
    path = _write(tmp_path, HEADER.strip() + ",split\n" + "\n".join(rows) + "\n")
    _, sites = load_csv_sites(_cfg(schema_path, path, split_column="split"))
    assert sites[0].sizes() == {"train": 3, "validation": 1, "test": 2}
    np.testing.assert_array_equal(sites[0].x_val[:, 0], [63])  # the row marked validation


def test_a_split_column_without_validation_rows_carves_them_from_train(schema_path, tmp_path):
    marks = ["train", "train", "train", "test", "train", "train"]
    rows = [f"{r},{m}" for r, m in zip(ROWS, marks, strict=True)]
    path = _write(tmp_path, HEADER.strip() + ",split\n" + "\n".join(rows) + "\n")
    _, sites = load_csv_sites(_cfg(schema_path, path, split_column="split"))
    assert sites[0].sizes()["test"] == 1 and sites[0].sizes()["validation"] >= 1


def test_a_bad_split_value_is_named(schema_path, tmp_path):
    rows = [f"{r},{'holdout' if i == 2 else 'train'}" for i, r in enumerate(ROWS)]
    path = _write(tmp_path, HEADER.strip() + ",split\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match="column 'split' has 1 rows whose value is not"):
        load_csv_sites(_cfg(schema_path, path, split_column="split"))


def test_test_files_with_a_site_column_go_to_their_sites(schema_path, tmp_path):
    train = [f"{r},{'b' if i % 2 else 'a'}" for i, r in enumerate(ROWS)]
    test = [f"{r},{'b' if i % 2 else 'a'}" for i, r in enumerate(ROWS[:4])]
    head = HEADER.strip() + ",hospital\n"
    path = _write(tmp_path, head + "\n".join(train) + "\n")
    test_path = _write(tmp_path, head + "\n".join(test) + "\n", "test.csv")
    _, sites = load_csv_sites(_cfg(schema_path, path, site_column="hospital",
                                   test_paths=(str(test_path),)))
    assert [(s.name, len(s.y_test), len(s.y_train) + len(s.y_val)) for s in sites] == \
        [("a", 2, 3), ("b", 2, 3)]


def test_test_files_must_match_the_site_files_one_to_one(schema_path, tmp_path):
    a = _write(tmp_path, HEADER + "\n".join(ROWS) + "\n", "north.csv")
    with pytest.raises(DataError, match="lists 2 files but 'data.csv_paths' lists 1"):
        load_csv_sites(_cfg(schema_path, a, test_paths=(str(a), str(a))))


@pytest.mark.parametrize("cell", ["1e39", "-1e39"])
def test_a_value_too_large_for_float32_is_refused_naming_column_and_rows(cell, tmp_path):
    # finite as read, but inf once encoded as float32: the site's mean would be inf, its
    # normalised rows NaN
    path = _write(tmp_path, SCHEMA_YAML.replace(", min: 18, max: 100", ""), "s.yaml")
    data = _write(tmp_path, HEADER + f"40,0,1,0\n{cell},0,1,0\n", "ward-7.csv")
    with pytest.raises(DataError, match=r"ward-7\.csv: column 'age' has 1 row \(row 3\) with a "
                                        r"value beyond"):
        read_csv_checked(data, load_schema(path))


def test_a_blank_line_before_the_header_reads_the_header_as_the_reader_does(tmp_path):
    # the reader skips blank lines before the header; the header look-ups must as well
    from client.check_data import _header_width
    from common.data.csv_source import has_column

    path = _write(tmp_path, "\n\nid," + HEADER + "".join(f"p{i},{r}\n" for i, r in
                                                          enumerate(ROWS)))
    assert has_column(path, "id") and not has_column(path, "ward")
    assert _header_width(path) == 5


def test_site_names_that_differ_only_in_surrounding_spaces_are_one_site(schema_path, tmp_path):
    rows = [f"{r},{'a ' if i % 2 else ' a'}" for i, r in enumerate(ROWS)]
    path = _write(tmp_path, HEADER.strip() + ",hospital\n" + "\n".join(rows) + "\n")
    _, sites = load_csv_sites(_cfg(schema_path, path, site_column="hospital"))
    assert [(s.name, sum(s.sizes().values())) for s in sites] == [("a", 6)]
