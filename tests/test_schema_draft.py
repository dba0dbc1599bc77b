"""`medfed schema`: a draft from the hospitals' CSVs that medfed accepts, and what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.heart import SITE_FILES, export_site_csv
from common.data.schema import load_schema
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


def test_a_text_column_is_left_out_and_named(tmp_path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("age,ward,y\n40,north,0\n50,south,1\n60,north,1\n")
    draft = draft_schema([path], "y")
    assert [c["name"] for c in draft.schema["columns"]] == ["age"]  # type: ignore[attr-defined]
    assert any("column 'ward' holds text" in d for d in draft.decisions)


def test_missing_cells_are_drafted_as_median_and_flagged(tmp_path) -> None:
    path = tmp_path / "site.csv"
    path.write_text("age,y\n40,0\n,1\n60,1\n55,0\n")
    draft = draft_schema([path], "y")
    assert draft.schema["columns"][0]["missing"] == "median"  # type: ignore[index]
    assert any("1 missing cell:" in d for d in draft.decisions)


@pytest.mark.parametrize(("label", "content", "fragment"), [
    ("outcome", "age,y\n40,0\n50,1\n", "label column 'outcome' not found"),
    ("y", "age,y\n40,0\n50,0\n", "single value"),
    ("y", "age,y\n40,0\n50,\n", "empty or not numbers"),
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
