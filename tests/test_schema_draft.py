"""`medfed schema`: a draft from the hospitals' CSVs that medfed accepts, and what it says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.data.csv_source import read_csv_checked
from common.data.heart import SITE_FILES, export_site_csv
from common.data.schema import DataError, Schema, load_schema
from common.data.schema_draft import draft_schema
from medfed.cli import EXIT_BAD_INPUT, main


@pytest.fixture(scope="module")
def heart_csvs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("heart-csv")
    for site in SITE_FILES:
        export_site_csv(site, out / f"{site}.csv")
    return [out / f"{site}.csv" for site in SITE_FILES]


def test_draft_of_the_heart_files_infers_types_ranges_and_label_codes(heart_csvs) -> None:
    draft = draft_schema(heart_csvs, "num")
    cols = {c["name"]: c for c in draft.schema["columns"]}  # type: ignore[attr-defined]
    assert {n: c["type"] for n, c in cols.items()} == {
        "age": "numeric", "sex": "binary", "cp": "categorical", "trestbps": "numeric",
        "chol": "numeric", "fbs": "binary", "restecg": "categorical", "thalach": "numeric",
        "exang": "binary", "oldpeak": "numeric"}
    assert cols["cp"]["categories"] == [1.0, 2.0, 3.0, 4.0]
    assert cols["age"]["min"] <= 28 and cols["age"]["max"] >= 77  # observed 28-77, widened
    assert (draft.schema["negative"], draft.schema["positive"]) == ([0.0], [1.0, 2.0, 3.0, 4.0])
    # what it cannot know is said, not guessed silently
    text = "\n".join(draft.decisions)
    assert "label 'num' has codes 0, 1, 2, 3, 4" in text
    assert "column 'chol' has" in text and "missing_values: [0]" in text


def test_the_drafted_schema_is_accepted_by_check_data(heart_csvs, tmp_path, monkeypatch,
                                                      capsys, signing_pub_path) -> None:
    monkeypatch.setenv("MEDFED_HOME", str(tmp_path / "home"))
    schema = tmp_path / "schema.yaml"
    assert main(["schema", "--data", *map(str, heart_csvs), "--label", "num",
                 "--out", str(schema)]) == 0
    out = capsys.readouterr().out
    assert "inferred:" in out and "needs a decision:" in out and "cp: categorical" in out
    load_schema(schema)
    config = tmp_path / "own.yaml"
    config.write_text(json.dumps({
        "name": "own", "model": {"hidden": [8]},
        "pretrain": {"data": {"source": "csv", "csv_paths": [str(heart_csvs[0])],
                              "csv_schema": str(schema)}, "optim": {"epochs": 2}},
        "federation": {"data": {"source": "csv", "csv_paths": [str(p) for p in heart_csvs],
                                "csv_schema": str(schema)}},
    }))
    bundle = tmp_path / "bundle"
    assert main(["pretrain", "--config", str(config), "--out", str(bundle)]) == 0
    capsys.readouterr()
    for path in heart_csvs:
        assert main(["check-data", "--model", str(bundle), "--data", str(path)]) == 0
        assert capsys.readouterr().out.startswith("ok: ")


def test_a_text_column_with_few_values_is_drafted_as_categorical_in_its_words(tmp_path):
    path = tmp_path / "site.csv"
    # 13 distinct patient texts: an identifier, not codes
    rows = [f"{40 + i},{'north' if i % 3 else 'South'},P{i},{i % 2}" for i in range(13)]
    path.write_text("age,ward,patient,y\n" + "\n".join(rows) + "\n")
    draft = draft_schema([path], "y")
    cols = {c["name"]: c for c in draft.schema["columns"]}  # type: ignore[attr-defined]
    assert cols["ward"] == {"name": "ward", "type": "categorical",
                            "categories": ["South", "north"]}
    assert "patient" not in cols  # left out, and said why
    assert any("column 'patient' holds text with 13 distinct values" in d
               for d in draft.decisions)
    assert Schema.from_dict(draft.schema).feature_names() == ["age", "ward=north"]


def test_codes_differing_only_in_case_and_numbers_mixed_with_text_are_questions(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("sex,chol,y\nM,200,0\nm,not done,1\nF,240,1\n,210,0\n")
    draft = draft_schema([path], "y")
    text = "\n".join(draft.decisions)
    assert "column 'sex' has 1 missing cell: drafted 'missing: most_frequent'" in text
    assert "column 'sex' has codes that differ only in case ('M', 'm')" in text
    assert "column 'chol' holds numbers and, in 1 row, text" in text
    assert [c["name"] for c in draft.schema["columns"]] == ["sex"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("labels", "negative", "why"), [
    (("disease", "healthy"), "healthy", "a word that usually means no disease"),
    (("malignant", "benign"), "benign", "a word that usually means no disease"),
    (("Yes", "No"), "No", "a word that usually means no disease"),
    (("type A", "type B"), "type A", "alphabetical order"),
])
def test_a_label_in_words_is_drafted_and_asked_about(labels, negative, why, tmp_path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("age,outcome\n" + "".join(f"{40 + i},{labels[i % 2]}\n" for i in range(6)))
    draft = draft_schema([path], "outcome")
    positive = [v for v in labels if v != negative]
    assert (draft.schema["negative"], draft.schema["positive"]) == ([negative], positive)
    assert draft.schema["labels"] == [negative, *positive]
    assert any(f"drafted {negative!r} as negative" in d and why in d for d in draft.decisions)


def test_files_in_words_go_from_draft_to_prediction(tmp_path, monkeypatch, capsys) -> None:
    """A hospital's export as it comes (sex F/M, smoker yes/no, outcome in words): `medfed
    schema` drafts what `pretrain`, `check-data` and `predict` then read."""
    monkeypatch.setenv("MEDFED_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(80):
        age, sex, smoker = int(rng.integers(30, 80)), str(rng.choice(["F", "M"])), \
            str(rng.choice(["no", "yes"]))
        risk = (age - 55) / 10 + (sex == "M") + (smoker == "yes") + rng.normal()
        rows.append(f"{age},{sex},{smoker},{'disease' if risk > 1 else 'healthy'}")
    data = tmp_path / "site.csv"
    data.write_text("age,sex,smoker,outcome\n" + "\n".join(rows) + "\n")
    schema = tmp_path / "schema.yaml"
    assert main(["schema", "--data", str(data), "--label", "outcome", "--out", str(schema)]) == 0
    assert 'categories: ["no", "yes"]' in schema.read_text()  # quoted: YAML would read booleans
    config = tmp_path / "own.yaml"
    config.write_text(json.dumps({
        "name": "own", "model": {"hidden": [8]},
        "pretrain": {"data": {"source": "csv", "csv_paths": [str(data)],
                              "csv_schema": str(schema)}, "optim": {"epochs": 2}},
        # the bundle's statistics: predict needs no hospital statistics file here
        "federation": {"data": {"source": "csv", "csv_paths": [str(data)],
                                "csv_schema": str(schema), "normalisation": "bundle"}},
    }))
    bundle, out = tmp_path / "bundle", tmp_path / "preds.csv"
    assert main(["pretrain", "--config", str(config), "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocessing"]["feature_names"] == ["age", "sex=M", "smoker=yes"]
    assert main(["check-data", "--model", str(bundle), "--data", str(data)]) == 0
    assert main(["predict", "--model", str(bundle), "--data", str(data), "--out", str(out)]) == 0
    header, *lines = out.read_text().splitlines()
    assert header.split(",")[:4] == ["row", "predicted", "p_healthy", "p_disease"]
    assert len(lines) == 80 and {ln.split(",")[1] for ln in lines} <= {"healthy", "disease"}
    capsys.readouterr()
    assert main(["model-card", "--model", str(bundle)]) == 0
    assert '| sex | categorical |  | codes "F", "M" | refuse |' in capsys.readouterr().out


def test_missing_cells_are_drafted_as_median_and_flagged(tmp_path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("age,y\n40,0\n,1\n60,1\n55,0\n")
    draft = draft_schema([path], "y")
    assert draft.schema["columns"][0]["missing"] == "median"  # type: ignore[index]
    assert any("1 missing cell:" in d for d in draft.decisions)


@pytest.mark.parametrize(("label", "content", "fragment"), [
    ("outcome", "age,y\n40,0\n50,1\n", "label column 'outcome' not found"),
    ("y", "age,y\n40,0\n50,0\n", "single value"),
    ("y", "age,y\n40,0\n50,\n", "site.csv: label column 'y' has 1 row (row 3) without a "
                                "value"),
    ("y", "age,y\n40,0\n50,sick\n", "site.csv: label column 'y' has 1 row (row 3) with text "
                                   "where other rows hold numbers"),
    # inf or beyond float32 (about 3.4e38): no range to draft, and no value medfed can store
    ("y", "age,y\n1e308,0\n-1e308,1\n", "site.csv: column 'age' has 2 rows (rows 2, 3) with "
                                        "a value that is infinite or beyond"),
    ("y", "age,y\n40,0\ninf,1\n", "site.csv: column 'age' has 1 row (row 3) with a value "
                                  "that is infinite or beyond"),
    ("y", "age,y\n40,0\n1e39,1\n", "site.csv: column 'age' has 1 row (row 3) with a value "
                                   "that is infinite or beyond"),
    ("y", "age,y\n", "site.csv: the file has a header but no data rows"),
    ("y", "age,y\n,\n,\n", "site.csv: the file has a header but no data rows"),
])
def test_bad_input_to_schema_is_one_sentence_and_writes_nothing(
        tmp_path, capsys, label, content, fragment) -> None:
    path = tmp_path / "site.csv"
    path.write_text(content)
    out = tmp_path / "schema.yaml"
    code = main(["schema", "--data", str(path), "--label", label, "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert code == EXIT_BAD_INPUT and len(err) == 1 and fragment in err[0]
    assert not out.exists()


def test_a_constant_code_column_is_left_out_and_said_why(tmp_path) -> None:
    # one code cannot be a categorical column (it needs two); a number the same in every row
    # tells the model nothing either
    path = tmp_path / "site.csv"
    path.write_text("age,grade,dose,flag,y\n40,3,2.5,0,0\n50,3,2.5,0,1\n60,3,2.5,0,1\n")
    draft = draft_schema([path], "y")
    assert [c["name"] for c in draft.schema["columns"]] == ["age"]  # type: ignore[attr-defined]
    for name, value in (("grade", "3"), ("dose", "2.5"), ("flag", "0")):
        # a decimal was drafted numeric with the range 2.5 to 2.5, an all-0 column binary
        assert f"column '{name}' holds a single value ({value}) in every row: left out" \
            in draft.decisions


@pytest.mark.parametrize(("second", "fragment"), [
    ("age,y\n40,0\n\n50,\n", "f2.csv: label column 'y' has 1 row (row 4) without a value"),
    ("age,y\n40,0\n50,sick\n", "f2.csv: label column 'y' has 1 row (row 3) with text where "
                               "other rows hold numbers"),
    ("age,y\n40,healthy\n50,sick\n", "f2.csv: label column 'y' has 2 rows (rows 2, 3) with "
                                     "text where the other files hold numbers"),
    # a label code medfed cannot store (it was drafted, then refused as schema key
    # 'positive[1]' with no file or row named)
    ("age,y\n40,0\n50,inf\n", "f2.csv: column 'y' has 1 row (row 3) with a value that is "
                              "infinite or beyond"),
])
def test_a_label_problem_names_the_file_and_rows_where_it_is(second, fragment, tmp_path):
    first, other = tmp_path / "f1.csv", tmp_path / "f2.csv"
    first.write_text("age,y\n40,0\n50,1\n")
    other.write_text(second)
    with pytest.raises(DataError) as err:
        draft_schema([first, other], "y")
    assert fragment in str(err.value)


def test_a_drafted_schema_accepts_the_file_it_was_drafted_from(tmp_path, capsys) -> None:
    # quoted cells can hold a newline or a tab; the YAML must keep them, not fold them
    path = tmp_path / "site.csv"
    codes = ['"a\nb"', '"tab\there"', "é"]
    path.write_text("x,c,y\n" + "".join(f"{i}.5,{codes[i % 3]},{i % 2}\n" for i in range(6)),
                    encoding="utf-8")
    out = tmp_path / "schema.yaml"
    assert main(["schema", "--data", str(path), "--label", "y", "--out", str(out)]) == 0
    schema = load_schema(out)
    assert schema.column("c").category_names == ("a\nb", "tab\there", "é")
    assert len(read_csv_checked(path, schema)) == 6
