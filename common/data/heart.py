"""Fed-Heart-Disease: the four UCI hospitals as natural sites, with two protocols.

``flamby`` mirrors owkin/FLamby ``flamby/datasets/fed_heart_disease/dataset.py`` step by step:
drop slope/ca/thal, drop rows that still have a ``?``, one-hot cp and restecg dropping the
first level (13 features), binary label ``num > 0``, and per centre
``train_test_split(arange(n), test_size=1 - 0.66, train_size=0.66, random_state=43,
shuffle=True, stratify=labels if both classes have more than 2 rows else None)``; rows keep
their file order inside each split. FLamby has no validation split: ours is carved from each
centre's train split (stratified, seeded; `data.validation_fraction`), so FLamby's test
split stays untouched. Per-centre z-normalisation on the train split happens in
:mod:`common.data.federated`.

``impute`` keeps every row and slope/ca/thal, and expresses its imputation as schema policy
(:func:`heart_schema`): chol == 0 and trestbps == 0 mean missing (the source files use 0 for
"not measured"), numeric columns are filled with the median and the others with the most
frequent code of the site's own training split (:class:`~common.data.preprocess.SiteStats`),
identically in training, evaluation and `medfed predict`. A column with no observed training
value at a site (Switzerland never measured chol) falls back to the bundle's statistic, i.e.
the pretraining cohort's.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from common.data.schema import DataError, Schema, encode, load_schema
from common.data.splits import DataSpec, SiteSplit, with_validation
from common.datasets import dataset_dir

SITE_FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
PROTOCOLS = ("flamby", "impute")
FLAMBY_DROPPED = ("slope", "ca", "thal")
TRAIN_FRACTION = 0.66  # FLamby's HeartDiseaseRaw.train_fraction
TEST_SEED = 43  # FLamby's split seed
ZERO_MEANS_MISSING = ("trestbps", "chol")

DATA_DIR = dataset_dir("heart_disease", "processed.cleveland.data")
SCHEMA_PATH = DATA_DIR / "schema.yaml"  # columns, units and ranges of the UCI files
# FLamby's splits of the shipped files, as scikit-learn computes them (write_known_splits)
KNOWN_SPLITS_PATH = DATA_DIR / "flamby_splits.json"


def heart_schema(protocol: str = "impute") -> Schema:
    """The heart schema: flamby drops slope, ca and thal; impute adds its missing policy."""
    if protocol not in PROTOCOLS:
        raise DataError(
            f"config key 'data.heart_protocol' must be one of {PROTOCOLS}, got {protocol!r}"
        )
    schema = load_schema(SCHEMA_PATH)
    if protocol == "flamby":
        return schema.without(FLAMBY_DROPPED)
    columns = tuple(
        replace(c, missing_values=(0.0,)) if c.name in ZERO_MEANS_MISSING else c
        for c in schema.columns)
    return replace(schema, columns=columns, missing="median")


def read_site(site: str, data_dir: Path | None = None) -> pd.DataFrame:
    """One hospital's raw rows as float columns named like the schema; ``?`` becomes NaN."""
    if site not in SITE_FILES:
        raise DataError(f"unknown heart site {site!r} (valid: {', '.join(SITE_FILES)})")
    path = Path(data_dir or DATA_DIR) / SITE_FILES[site]
    schema = heart_schema("impute")
    names = [c.name for c in schema.columns] + [schema.label]
    try:
        df = pd.read_csv(path, header=None, na_values=["?"], keep_default_na=False)
    except FileNotFoundError as err:
        raise DataError(f"heart data file {path} does not exist") from err
    if df.shape[1] != len(names):
        raise DataError(f"{path}: expected {len(names)} columns per row, found {df.shape[1]}")
    df.columns = names
    bad = [c for c in names if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise DataError(f"{path}: column '{bad[0]}' holds text other than '?'")
    return df.astype("float64")


def _split_key(y: np.ndarray, seed: int) -> str:
    """What a split depends on: the label vector and the seed."""
    return hashlib.sha256(np.asarray(y, dtype=np.int64).tobytes() + b"|%d" % seed).hexdigest()


@functools.cache
def _known_splits() -> dict[str, list[int]]:
    """Test rows of the recorded splits by :func:`_split_key` (empty if the file is absent)."""
    try:
        raw = json.loads(KNOWN_SPLITS_PATH.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return {key: entry["test"] for key, entry in raw["splits"].items()}


def _sklearn_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's call to scikit-learn's ``train_test_split``; sorted (train, test) indices."""
    # imported here: scikit-learn and SciPy cost about 1 s of CPU in every process that loads
    # heart data (each simulated hospital, the ServerApp), and the shipped files need none
    from sklearn.model_selection import train_test_split

    levels = np.unique(y)
    stratified = len(levels) > 1 and all((y == lev).sum() > 2 for lev in levels)
    train, test = train_test_split(
        np.arange(len(y)),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=seed,
        shuffle=True,
        stratify=y if stratified else None,
    )
    return np.sort(train), np.sort(test)


def flamby_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-centre split of ``arange(len(y))``; returns sorted (train, test) indices.

    Label vectors of the shipped files take the recorded split (tests check it equals
    scikit-learn's); any other data or seed is split by scikit-learn.
    """
    y = np.asarray(y)
    known = _known_splits().get(_split_key(y, seed))
    if known is None:
        return _sklearn_split(y, seed)
    test = np.asarray(known, dtype=np.int64)
    return np.setdiff1d(np.arange(len(y)), test), test


def _binary(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    return np.isin(df[schema.label].to_numpy(), schema.positive).astype(np.int64)


def _protocol_rows(df: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The rows (and columns) a protocol keeps: flamby drops three columns, then rows with a
    missing value; impute keeps everything."""
    if protocol != "flamby":
        return df
    return df.drop(columns=list(FLAMBY_DROPPED)).dropna(axis=0).reset_index(drop=True)


def _split_frame(df: pd.DataFrame, schema: Schema, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, test = flamby_split(_binary(df, schema), seed)
    return df.iloc[train].reset_index(drop=True), df.iloc[test].reset_index(drop=True)


def _site_frames(
    protocol: str, sites: tuple[str, ...], seed: int, data_dir: Path | None
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per site (train, test) frames ready for :func:`encode` (impute: NaN where missing)."""
    schema = heart_schema(protocol)
    frames = {}
    for site in sites:
        frames[site] = _split_frame(_protocol_rows(read_site(site, data_dir), protocol),
                                    schema, seed)
    return frames


def shipped_label_vectors() -> dict[str, np.ndarray]:
    """Each shipped site's binary labels under each protocol, as :func:`_site_frames` splits
    them (named ``<protocol>/<site>``)."""
    vectors = {}
    for protocol in PROTOCOLS:
        schema = heart_schema(protocol)
        for site in SITE_FILES:
            df = _protocol_rows(read_site(site), protocol)
            vectors[f"{protocol}/{site}"] = _binary(df, schema)
    return vectors


def write_known_splits(path: Path = KNOWN_SPLITS_PATH, seed: int = TEST_SEED) -> None:
    """Record scikit-learn's FLamby split of every shipped label vector (run once per change
    of the shipped files or of FLamby's protocol)."""
    splits: dict[str, dict[str, object]] = {}
    for name, y in shipped_label_vectors().items():
        key = _split_key(y, seed)
        if key in splits:  # another protocol kept the same rows (Cleveland has no gap)
            splits[key]["name"] = f"{splits[key]['name']}, {name}"
            continue
        _, test = _sklearn_split(y, seed)
        splits[key] = {"name": name, "seed": seed, "rows": len(y), "test": test.tolist()}
    about = ("FLamby's train/test split of each shipped heart file (test rows), as "
             "scikit-learn's train_test_split computes it; keyed by sha256 of the int64 label "
             "vector and the seed; written by common.data.heart.write_known_splits")
    lines = [f"  {json.dumps(key)}: {json.dumps(entry)}" for key, entry in splits.items()]
    path.write_text(f'{{"about": {json.dumps(about)},\n "splits": {{\n' + ",\n".join(lines)
                    + "\n }\n}\n", encoding="utf-8")


def spec_for(schema: Schema) -> DataSpec:
    """The DataSpec of a binary tabular source described by `schema`."""
    names = tuple(schema.feature_names())
    return DataSpec("tabular", (len(names),), 2, schema.labels, names, schema)


def load_heart_sites(
    protocol: str = "flamby",
    sites: tuple[str, ...] = (),
    split_seed: int = 43,
    data_dir: Path | None = None,
    val_fraction: float = 0.2,
) -> tuple[DataSpec, list[SiteSplit]]:
    """The natural heart sites, raw (not normalised), in the order of :data:`SITE_FILES`.

    Train and test are FLamby's; validation is carved from FLamby's train split.
    """
    schema = heart_schema(protocol)
    unknown = [s for s in sites if s not in SITE_FILES]
    if unknown:
        raise DataError(
            f"config key 'data.sites' names unknown heart site {unknown[0]!r} "
            f"(valid: {', '.join(SITE_FILES)})"
        )
    chosen = tuple(s for s in SITE_FILES if not sites or s in sites)
    splits = []
    for site, (train, test) in _site_frames(protocol, chosen, split_seed, data_dir).items():
        where = f"{SITE_FILES[site]} ({protocol} protocol)"
        x_tr, y_tr = encode(train, schema, where + " train split")
        x_te, y_te = encode(test, schema, where + " test split")
        assert y_tr is not None and y_te is not None  # the label column is always present
        splits.append(with_validation(site, x_tr, y_tr, x_te, y_te, val_fraction, split_seed))
    return spec_for(schema), splits


def export_site_csv(site: str, out: Path, protocol: str = "flamby",
                    test_out: Path | None = None) -> int:
    """Write one hospital's rows as a CSV with a header, the form `medfed client` reads.

    Rows with missing values are dropped for the flamby protocol (as FLamby does); the label
    column keeps its raw 0-4 codes. With `test_out`, FLamby's test rows of the site go there
    and only its train rows to `out` (a test file kept aside). Returns the rows written.
    """
    schema = heart_schema(protocol)
    df = _protocol_rows(read_site(site), protocol)
    columns = [c.name for c in schema.columns] + [schema.label]
    parts = [(out, df)]
    if test_out is not None:
        train, test = _split_frame(df, schema, TEST_SEED)
        parts = [(out, train), (test_out, test)]
    for path, frame in parts:
        path.parent.mkdir(parents=True, exist_ok=True)
        frame[columns].to_csv(path, index=False, float_format="%g")
    return sum(len(frame) for _, frame in parts)
