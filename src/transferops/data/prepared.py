"""The prepared format every step reads: ``data.out/`` as `prepare` writes it.

``manifest.json`` (class names, counts per split, the source files' and the prepared
artifacts' hashes), and per split ``<split>.safetensors`` (uint8 images + labels) or
``<split>.jsonl`` (texts + labels). Reading it needs nothing of `prepare` itself.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from transferops.data.readers import SplitName
from transferops.errors import DataError
from transferops.runtime.artifacts import read_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Audit of the splits read in this process (tests assert the test split is read only by
# `evaluate`).
SPLIT_READS: Counter[str] = Counter()


@dataclass
class PreparedData:
    """One split of prepared data, ready for training."""

    split: SplitName
    modality: Literal["image", "text"]
    labels: torch.Tensor  # int64 [N]
    class_names: list[str]
    images: torch.Tensor | None = None  # uint8 [N, 3, H, W]
    texts: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def prepared_data_hash(out: Path | str = "data/prepared") -> str:
    """The content hash of prepared data (recorded in MLflow tags downstream)."""
    return str(read_manifest(out)["data_hash"])


def read_manifest(out: Path | str) -> dict[str, Any]:
    """Read and return the prepared-data manifest, with a clear error if it is missing."""
    path = Path(out) / MANIFEST
    if not path.exists():
        raise DataError(f"{path} not found: run `transferops prepare` first")
    return read_json(path)


def load_prepared(out: Path | str, split: SplitName) -> PreparedData:
    """Load one split of prepared data. The test split is for `evaluate` only."""
    SPLIT_READS[split] += 1
    out = Path(out)
    manifest = read_manifest(out)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{out} was prepared by another version: run `transferops prepare --force`")
    names = manifest["class_names"]
    if manifest["modality"] == "image":
        t = load_file(str(out / f"{split}.safetensors"))
        return PreparedData(split, "image", t["labels"], names, images=t["images"])
    texts, labels = [], []
    with open(out / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(row["label"])
    return PreparedData(split, "text", torch.tensor(labels, dtype=torch.int64), names, texts=texts)
