"""What the benchmarks share: the packaged digits demo prepared at one size and
EfficientNet-Lite0 (its packaged weights) pulled, in a fresh temporary folder; a finished
quality-benchmark project's chosen configuration, its outputs redirected."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from transferops.config import Config, load_config, validate_config, with_overrides
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


def chosen_config(project: Path, work: Path | str, overrides: dict[str, Any]) -> Config:
    """A finished ``bench/quality.py`` project's config with its search's chosen params
    (``models/search/best_params.json``), everything a rerun writes (study, baseline runs,
    MLflow, checkpoints) redirected into `work`, and `overrides` on top."""
    cfg = load_config(project / "params.yaml")
    best = json.loads((project / "models" / "search" / "best_params.json").read_text())
    return with_overrides(
        cfg,
        best
        | {
            "search.storage": f"sqlite:///{work}/optuna.db",
            "baseline.out": f"{work}/baseline",
            "tracking.uri": f"sqlite:///{work}/mlflow.db",
            "tracking.artifact_location": f"{work}/art",
            "finetune.checkpoint_dir": f"{work}/ck",
        }
        | overrides,
    )
