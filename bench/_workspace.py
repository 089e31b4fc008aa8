"""What the benchmarks share: the packaged digits demo prepared at one size and
EfficientNet-Lite0 (its packaged weights) pulled, in a fresh temporary folder; a finished
quality-benchmark project's chosen configuration, its outputs redirected; a saved model's
probabilities on prepared splits."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferops.config import Config, load_config, validate_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import PreparedData, load_prepared
from transferops.model.folder import load_finetuned
from transferops.model.inputs import Inputs, folder_inputs
from transferops.model.predict import predict_probs
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


def folder_probs(folder: Path, splits: dict[str, PreparedData]) -> dict[str, np.ndarray]:
    """The model folder's class probabilities on each prepared split, on the CPU as
    `predict` serves them, at temperature 1 (the models compared, not their calibration)."""
    net, spec = load_finetuned(folder)
    out = {}
    for name, data in splits.items():
        inputs = folder_inputs(data, folder, spec)
        out[name] = predict_probs(net, spec | {"temperature": 1.0}, inputs, torch.device("cpu"))
    return out
