"""The whole pipeline as plain function calls (what `transferops run` does).

Each step is the same library function the CLI verbs, DVC stages and Prefect tasks call.
"""

from __future__ import annotations

import logging
from typing import Any

from transferops.config import Config, with_overrides
from transferops.data.prepare import prepare
from transferops.finetune.train import train_from_config
from transferops.search import run_search
from transferops.sources import pull

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """prepare -> pull -> search -> train (best params); returns a summary."""
    prep = prepare(cfg)
    src = pull(cfg.source)
    found = run_search(cfg)
    res = train_from_config(with_overrides(cfg, found.best_params))
    return {
        "data_hash": prep.data_hash,
        "counts": prep.counts,
        "source": src.manifest["origin"],
        "source_sha256": src.manifest["sha256"],
        "study": found.study_name,
        "best_params": found.best_params,
        "trials": {k: v for k, v in found.counts.items() if v},
        "unfreeze_depth": res.unfreeze_depth,
        "val_accuracy": round(res.best_val_accuracy, 4),
        "epochs": res.epochs_run,
        "train_seconds": round(res.seconds, 1),
        "model": str(cfg.finetune.out),
    }
