"""The whole pipeline as plain function calls (what `transferops run` does).

Each step is the same library function the CLI verbs, DVC stages and Prefect tasks call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transferops.baseline import run_baselines
from transferops.config import Config, with_overrides
from transferops.data.prepare import prepare
from transferops.evaluate import evaluate
from transferops.finetune.train import train_from_config
from transferops.search import run_search
from transferops.sources import pull

log = logging.getLogger(__name__)


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """prepare -> pull -> search -> train -> baseline -> evaluate; returns a summary."""
    prep = prepare(cfg)
    src = pull(cfg.source)
    found = run_search(cfg)
    best = with_overrides(cfg, found.best_params)
    res = train_from_config(best)
    run_baselines(best)
    report = evaluate(best)
    test_acc = {
        role: m["accuracy"]["mean"] if isinstance(m["accuracy"], dict) else m["accuracy"]
        for role, m in report["models"].items()
    }
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
        "test_accuracy": {k: round(v, 4) for k, v in test_acc.items()},
        "verdict": report["verdict"],
        "report": str(Path(cfg.evaluate.out) / "evaluation.md"),
    }
