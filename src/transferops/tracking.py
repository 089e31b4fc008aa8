"""MLflow set-up, in one place: embedded sqlite by default, a server URI when configured."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transferops.config import TrackingConfig

log = logging.getLogger(__name__)


def setup_tracking(cfg: TrackingConfig) -> Any:
    """Point MLflow at `cfg.uri` and select (creating if needed) the experiment.

    Returns the mlflow module, so callers import it only through here.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import mlflow

    mlflow.set_tracking_uri(cfg.uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        loc = cfg.artifact_location
        if "://" not in loc:  # a local folder: MLflow wants an absolute URI
            loc = Path(loc).resolve().as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=loc)
    mlflow.set_experiment(cfg.experiment)
    return mlflow
