"""medfed data layer: schemas, sources (heart, MedMNIST, CSV, synthetic), partitioning,
normalisation, and :func:`load_federated` which turns a ``DataConfig`` into hospitals."""

from common.data.federated import (
    DataSpec,
    FederatedData,
    SiteSplit,
    load_federated,
    load_source_split,
    split_site,
)
from common.data.normalise import Normaliser
from common.data.schema import Column, DataError, Schema, encode, load_schema, validate_frame

__all__ = [
    "Column",
    "DataError",
    "DataSpec",
    "FederatedData",
    "Normaliser",
    "Schema",
    "SiteSplit",
    "encode",
    "load_federated",
    "load_schema",
    "load_source_split",
    "split_site",
    "validate_frame",
]
