"""The whole pipeline as plain function calls (what `transferops run` does today).

Each step is the same library function the CLI verbs, DVC stages and Prefect tasks call.
"""

from __future__ import annotations

import logging
from typing import Any

from transferops.config import Config
from transferops.data.prepare import prepare
from transferops.finetune.train import train_from_config
from transferops.sources import pull

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """prepare -> pull -> train; returns a summary (hashes, metrics, outputs)."""
    prep = prepare(cfg)
    src = pull(cfg.source)
    res = train_from_config(cfg)
    return {
        "data_hash": prep.data_hash,
        "counts": prep.counts,
        "source": src.manifest["origin"],
        "source_sha256": src.manifest["sha256"],
        "unfreeze_depth": res.unfreeze_depth,
        "val_accuracy": round(res.best_val_accuracy, 4),
        "epochs": res.epochs_run,
        "train_seconds": round(res.seconds, 1),
        "model": str(cfg.finetune.out),
    }
