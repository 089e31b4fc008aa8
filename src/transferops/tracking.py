"""MLflow set-up, in one place: embedded sqlite by default, a server URI when configured."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transferops.config import TrackingConfig

log = logging.getLogger(__name__)


def absolute_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` relative to the working directory -> an absolute sqlite URI.

    MLflow caches its store per URI string, so a relative one would keep pointing at the
    first directory it was opened in after a chdir (tests, a Prefect worker).
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def setup_tracking(cfg: TrackingConfig) -> Any:
    """Point MLflow at `cfg.uri` and select (creating if needed) the experiment.

    Returns the mlflow module, so callers import it only through here.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import mlflow

    mlflow.set_tracking_uri(absolute_uri(cfg.uri))
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        loc = cfg.artifact_location
        if "://" not in loc:  # a local folder: MLflow wants an absolute URI
            loc = Path(loc).resolve().as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=loc)
    mlflow.set_experiment(cfg.experiment)
    return mlflow


def run_link(cfg: TrackingConfig, run_id: str) -> str:
    """A link to an MLflow run: the server's page, or the local `make ui` page for sqlite."""
    mlflow = setup_tracking(cfg)
    exp = mlflow.get_run(run_id).info.experiment_id
    base = cfg.uri.rstrip("/") if cfg.uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp}/runs/{run_id}"


def log_epoch(epoch: int, record: dict[str, float]) -> None:
    """An engine ``on_epoch_end`` hook: the epoch's metrics into the active MLflow run."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
