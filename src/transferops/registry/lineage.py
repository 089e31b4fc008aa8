"""What every registered version carries about where it came from: data, source, code,
params, the search and the test evidence, as MLflow tags (strings)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from transferops.config import Config, FinetuneConfig
from transferops.evaluation.stats import SCORES

METRICS = SCORES  # each as test_<metric> (and <baseline>_<metric>) on the model version
NOT_GIT = "not a git repository"


def git_commit(cwd: Path | str = ".") -> tuple[str, bool]:
    """(HEAD commit, whether tracked files differ from it); ("not a git repository", False)
    outside git (or without git installed)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return NOT_GIT, False
    return sha, bool(dirty)


def trained_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The finetune params a model folder was trained with, without its output paths."""
    return {k: v for k, v in spec["finetune"].items() if k not in FinetuneConfig.OUTPUT_FIELDS}


def lineage_tags(
    cfg: Config, spec: dict, metrics: dict, search: dict | None, model_sha: str
) -> dict[str, str]:
    """Tags every registered version carries (values are strings, as MLflow stores them)."""
    commit, dirty = git_commit()
    ft = metrics["finetuned"]
    gain = metrics["transfer_minus_scratch"]["accuracy"]
    models = metrics["models"]
    tags: dict[str, Any] = {
        "data_hash": spec["data_hash"],
        "source_origin": spec["source"]["origin"],
        "source_sha256": spec["source"]["sha256"],
        "git_commit": commit,
        "git_dirty": dirty,
        "model_sha256": model_sha,
        "params": json.dumps(trained_params(spec), sort_keys=True),
        "classes": json.dumps(spec["class_names"]),
        "val_accuracy": spec.get("val_accuracy"),
        # classical: fine-tuning did not beat logistic regression on pixels on val (train.py)
        "candidate": spec.get("candidate", "finetuned"),
        "test_size": metrics["test_size"],
        "verdict": metrics["verdict"],
        "transfer_beats_scratch": metrics["transfer_beats_scratch"],
        "transfer_minus_scratch": gain["mean"],
        # the interval the promotion gate reads (None with a single seed: no interval)
        "transfer_minus_scratch_ci_low": gain["ci_low"],
        "transfer_minus_scratch_ci_high": gain["ci_high"],
    }
    for m in METRICS:
        tags[f"test_{m}"] = ft[m]
        for role in ("scratch", "probe"):
            if role in models:
                tags[f"{role}_{m}"] = models[role][m]["mean"]
        if "classical" in models:
            tags[f"classical_{m}"] = models["classical"][m]
    if "dropped_classes" in ft:  # what the dropped-class gate reads
        tags["dropped_classes"] = json.dumps(ft["dropped_classes"])
    for role, d in ft.get("minus", {}).items():  # what the cheap-baseline gate reads
        tags |= {f"minus_{role}_{k}": d[k] for k in ("mean", "ci_low", "ci_high")}
    if search is not None:
        tags |= {
            "best_trial": f"{search['study_name']}#{search['best_trial']}",
            "best_params": json.dumps(search["best_params"], sort_keys=True),
            "search_run_id": search.get("mlflow_run_id"),
        }
        noise = search.get("within_noise")
        if noise:  # how many configurations val could not tell from the best
            tags["search_within_noise"] = f"{len(noise['trials'])} of {noise['of']}"
    return {k: _tag(v) for k, v in tags.items() if v is not None}


def _tag(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
