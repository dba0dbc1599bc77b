"""medfed data layer: schemas, sources (heart, MedMNIST, CSV, synthetic), the three-split
contract, partitioning, preprocessing, and :func:`load_federated` which turns a ``DataConfig``
into hospitals."""

from common.data.federated import FederatedData, load_federated, load_source_split
from common.data.normalise import Normaliser
from common.data.preprocess import SiteStats
from common.data.schema import Column, DataError, Schema, encode, load_schema, validate_frame
from common.data.splits import DataSpec, SiteSplit, carve

__all__ = [
    "Column",
    "DataError",
    "DataSpec",
    "FederatedData",
    "Normaliser",
    "Schema",
    "SiteSplit",
    "SiteStats",
    "carve",
    "encode",
    "load_federated",
    "load_schema",
    "load_source_split",
    "validate_frame",
]
