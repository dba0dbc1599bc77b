"""Fed-Heart-Disease: the four UCI hospitals as natural sites, with two protocols.

``flamby`` mirrors owkin/FLamby ``flamby/datasets/fed_heart_disease/dataset.py`` step by step:
drop slope/ca/thal, drop rows that still have a ``?``, one-hot cp and restecg dropping the
first level (13 features), binary label ``num > 0``, and per centre
``train_test_split(arange(n), test_size=1 - 0.66, train_size=0.66, random_state=43,
shuffle=True, stratify=labels if both classes have more than 2 rows else None)``; rows keep
their file order inside each split. Per-centre z-normalisation on the train split happens in
:mod:`common.data.federated`.

``impute`` keeps every row and slope/ca/thal, treats chol == 0 and trestbps == 0 as missing
(the source files use 0 for "not measured"), splits with the same rule and seed, and fills
missing values with the median (numeric) or mode (binary, categorical) of the site's own train
split. A column with no observed train value at a site (Switzerland never measured chol)
falls back to the statistic of the four sites' pooled train splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from common.data.federated import DataSpec, SiteSplit
from common.data.schema import DataError, Schema, encode, load_schema
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
ZERO_MEANS_MISSING = ("trestbps", "chol")

DATA_DIR = dataset_dir("heart_disease", "processed.cleveland.data")
SCHEMA_PATH = DATA_DIR / "schema.yaml"  # columns, units and ranges of the UCI files


def heart_schema(protocol: str = "impute") -> Schema:
    """The heart schema; the flamby protocol drops slope, ca and thal."""
    if protocol not in PROTOCOLS:
        raise DataError(
            f"config key 'data.heart_protocol' must be one of {PROTOCOLS}, got {protocol!r}"
        )
    schema = load_schema(SCHEMA_PATH)
    return schema.without(FLAMBY_DROPPED) if protocol == "flamby" else schema


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


def flamby_split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's per-centre split of ``arange(len(y))``; returns sorted (train, test) indices."""
    y = np.asarray(y)
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


def fit_imputer(
    train: pd.DataFrame, schema: Schema, fallback: dict[str, float] | None = None
) -> dict[str, float]:
    """Fill value per feature column: median (numeric) or most frequent code (others).

    Ties in the mode go to the smallest code. Columns with no observed value use
    ``fallback[column]`` (DataError when there is none).
    """
    stats: dict[str, float] = {}
    for col in schema.columns:
        values = train[col.name].dropna()
        if len(values) == 0:
            if fallback is None or col.name not in fallback:
                raise DataError(f"column '{col.name}' has no observed value to impute from")
            stats[col.name] = fallback[col.name]
        elif col.type == "numeric":
            stats[col.name] = float(values.median())
        else:
            stats[col.name] = float(values.mode().min())
    return stats


def _impute_frame(site: str, data_dir: Path | None) -> pd.DataFrame:
    df = read_site(site, data_dir)
    for name in ZERO_MEANS_MISSING:
        df.loc[df[name] == 0, name] = np.nan
    return df


def _binary(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    return np.isin(df[schema.label].to_numpy(), schema.positive).astype(np.int64)


def _split_frame(df: pd.DataFrame, schema: Schema, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    train, test = flamby_split(_binary(df, schema), seed)
    return df.iloc[train].reset_index(drop=True), df.iloc[test].reset_index(drop=True)


def _site_frames(
    protocol: str, sites: tuple[str, ...], seed: int, data_dir: Path | None
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per site (train, test) frames ready for :func:`encode` (no missing values left)."""
    schema = heart_schema(protocol)
    if protocol == "flamby":
        frames = {}
        for site in sites:
            df = read_site(site, data_dir).drop(columns=list(FLAMBY_DROPPED))
            frames[site] = _split_frame(df.dropna(axis=0).reset_index(drop=True), schema, seed)
        return frames
    # impute: the pooled-train fallback always uses all four sites so that a site's data does
    # not depend on which other sites were selected
    raw = {s: _split_frame(_impute_frame(s, data_dir), schema, seed) for s in SITE_FILES}
    pooled = fit_imputer(pd.concat([tr for tr, _ in raw.values()]), schema)
    frames = {}
    for site in sites:
        train, test = raw[site]
        stats = fit_imputer(train, schema, fallback=pooled)
        frames[site] = (train.fillna(stats), test.fillna(stats))
    return frames


def spec_for(schema: Schema) -> DataSpec:
    """The DataSpec of a binary tabular source described by `schema`."""
    names = tuple(schema.feature_names())
    return DataSpec("tabular", (len(names),), 2, schema.labels, names, schema)


def load_heart_sites(
    protocol: str = "flamby",
    sites: tuple[str, ...] = (),
    split_seed: int = 43,
    data_dir: Path | None = None,
) -> tuple[DataSpec, list[SiteSplit]]:
    """The natural heart sites, raw (not normalised), in the order of :data:`SITE_FILES`."""
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
        splits.append(SiteSplit(site, x_tr, y_tr, x_te, y_te))
    return spec_for(schema), splits


def export_site_csv(site: str, out: Path, protocol: str = "flamby") -> int:
    """Write one hospital's rows as a CSV with a header, the form `medfed client` reads.

    Rows with missing values are dropped for the flamby protocol (as FLamby does); the label
    column keeps its raw 0-4 codes. Returns the number of rows written.
    """
    schema = heart_schema(protocol)
    df = read_site(site)
    if protocol == "flamby":
        df = df.drop(columns=list(FLAMBY_DROPPED)).dropna(axis=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = [c.name for c in schema.columns] + [schema.label]
    df[columns].to_csv(out, index=False, float_format="%g")
    return len(df)
