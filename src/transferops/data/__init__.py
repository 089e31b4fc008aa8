"""Data in: readers, built-in demo sets, and `prepare` (fixed, hashed splits)."""

from transferops.data.prepare import (
    PreparedData,
    PrepareResult,
    load_prepared,
    prepare,
    prepared_data_hash,
    read_manifest,
)
from transferops.data.readers import RawDataset, read_dataset

__all__ = [
    "PrepareResult",
    "PreparedData",
    "RawDataset",
    "load_prepared",
    "prepare",
    "prepared_data_hash",
    "read_dataset",
    "read_manifest",
]
