"""What the image benchmarks share: the packaged digits demo prepared at one size and
EfficientNet-Lite0 (its packaged weights) pulled, in a fresh temporary folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from transferops.config import Config, validate_config
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.model.inputs import Inputs
from transferops.sources.pull import pull


def digits_workspace(
    size: int, limit_per_class: int | None = None
) -> tuple[Config, Inputs, Inputs]:
    """(config, train, val) of the digits demo at `size` px; `limit_per_class` training
    images per class (None = all 1,259)."""
    work = Path(tempfile.mkdtemp(prefix="transferops-bench-"))
    cfg = validate_config(
        {
            "data": {
                "path": str(work / "raw"),
                "out": str(work / "prep"),
                "image": {"size": size},
                "limit_per_class": limit_per_class,
            },
            "source": {"out": str(work / "src")},
        }
    )
    prepare(cfg)
    pull(cfg.source)
    tr, va = load_prepared(cfg.data.out, "train"), load_prepared(cfg.data.out, "val")
    return cfg, Inputs(tr.images, tr.labels), Inputs(va.images, va.labels)
