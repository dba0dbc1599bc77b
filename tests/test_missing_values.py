"""Missing values as schema policy: fitted on each site's training split only, applied the
same way in training, evaluation and prediction (common/data/preprocess.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import DataConfig
from common.data import DataError, SiteStats, encode, load_schema
from common.data.csv_source import load_csv_sites, read_csv_checked
from common.data.preprocess import read_site_stats

HEADER = "age,smoker,stage,chol,outcome\n"
# rows with holes: age (numeric), smoker (binary), stage (categorical), chol 0 = not measured
TRAIN = ["40,0,1,200,0", ",1,2,0,1", "63,,3,250,1", "70,0,,180,0", "48,1,1,,0", "59,0,3,210,1",
         "52,1,2,230,1", "45,0,2,190,0", "61,1,3,0,1", "38,0,1,170,0"]


def _schema(tmp: Path, age: str = "median", extra: str = "") -> Path:
    path = tmp / "schema.yaml"
    path.write_text(f"""\
label: outcome
positive: [1]
negative: [0]
columns:
  - {{name: age, type: numeric, min: 18, max: 100, missing: {age}{extra}}}
  - {{name: smoker, type: binary, missing: most_frequent}}
  - {{name: stage, type: categorical, categories: [1, 2, 3], missing: most_frequent}}
  - {{name: chol, type: numeric, min: 0, max: 700, missing: mean, missing_values: [0],
      missing_indicator: true}}
""")
    return path


def _encoded(tmp: Path, rows: list[str], schema: Path) -> np.ndarray:
    path = tmp / "site.csv"
    path.write_text(HEADER + "\n".join(rows) + "\n")
    s = load_schema(schema)
    x, _ = encode(read_csv_checked(path, s), s, str(path))
    return x


def test_each_policy_fills_with_the_training_statistic(tmp_path: Path) -> None:
    schema = load_schema(_schema(tmp_path))
    assert schema.feature_names() == ["age", "smoker", "chol", "stage=2", "stage=3",
                                      "chol:missing"]
    x = _encoded(tmp_path, TRAIN, _schema(tmp_path))
    stats = SiteStats.fit(x, schema)
    assert stats.fill is not None
    ages = [40, 63, 70, 48, 59, 52, 45, 61, 38]
    chols = [200, 250, 180, 210, 230, 190, 170]  # zeros and the blank are missing
    assert stats.fill[0] == np.median(ages)
    assert stats.fill[1] == 0.0  # smoker: 0 five times, 1 four times
    assert stats.fill[2] == pytest.approx(np.mean(chols))
    # stage: 1 three times, 2 three times, 3 three times -> ties go to the smallest code
    assert list(stats.fill[3:5]) == [0.0, 0.0]
    np.testing.assert_array_equal(x[:, 5], [0, 1, 0, 0, 1, 0, 0, 0, 1, 0])  # chol:missing
    filled = stats.apply(x) * stats.normaliser.std + stats.normaliser.mean
    assert filled[1, 0] == pytest.approx(np.median(ages))
    assert not np.isnan(stats.apply(x)).any()


def test_constant_policy_fills_the_given_value(tmp_path: Path) -> None:
    schema_path = _schema(tmp_path, age="constant", extra=", fill_value: 50")
    stats = SiteStats.fit(_encoded(tmp_path, TRAIN, schema_path), load_schema(schema_path))
    assert stats.fill is not None and stats.fill[0] == 50.0


def test_refuse_names_the_column_and_how_to_allow_it(tmp_path: Path) -> None:
    with pytest.raises(DataError,
                       match=r"column 'age' has 1 row \(row 3\) with missing values.*missing:"):
        _encoded(tmp_path, TRAIN, _schema(tmp_path, age="refuse"))


def test_statistics_come_from_the_training_split_only(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    train = tmp_path / "north.csv"
    train.write_text(HEADER + "\n".join(TRAIN) + "\n")
    test = tmp_path / "north-test.csv"
    cfg = DataConfig(source="csv", csv_paths=(str(train),), test_paths=(str(test),),
                     csv_schema=str(schema))
    fitted = []
    for test_rows in (["30,0,1,,0", "80,1,3,650,1"], ["99,1,2,,1", "19,0,1,100,0"]):
        test.write_text(HEADER + "\n".join(test_rows) + "\n")
        site = load_csv_sites(cfg)[1][0]
        assert len(site.y_test) == 2  # the test file, untouched by any carving
        fitted.append(SiteStats.fit(site.x_train, load_schema(schema)).to_dict())
    assert fitted[0] == fitted[1]  # changing test values changes no statistic


def test_statistics_round_trip_through_site_stats_json(tmp_path: Path) -> None:
    schema = _schema(tmp_path)
    stats = SiteStats.fit(_encoded(tmp_path, TRAIN, schema), load_schema(schema))
    path = tmp_path / "site_stats.json"
    path.write_text(stats.to_json())
    again = read_site_stats(path)
    x = _encoded(tmp_path, ["55,,,,1"], schema)  # a patient with three missing cells
    np.testing.assert_array_equal(stats.apply(x), again.apply(x))


@pytest.mark.parametrize(("column", "fragment"), [
    ("{name: stage, type: categorical, categories: [1, 2], missing: median}",
     "must be one of refuse, most_frequent, constant"),
    ("{name: age, type: numeric, missing: constant}", "fill_value' is needed"),
    ("{name: stage, type: categorical, categories: [1, 2], missing: constant, fill_value: 3}",
     "one of the categories"),
    ("{name: age, type: numeric, fill_value: 3}", "only used with 'missing: constant'"),
])
def test_bad_missing_policy_in_a_schema_is_named(tmp_path: Path, column: str,
                                                 fragment: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"label: y\npositive: [1]\nnegative: [0]\ncolumns:\n  - {column}\n")
    with pytest.raises(DataError, match=fragment):
        load_schema(path)


def test_a_schema_file_with_yaml_aliases_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("label: y\npositive: &p [1]\nnegative: *p\ncolumns: []\n")
    with pytest.raises(DataError, match="anchor or alias"):
        load_schema(path)
