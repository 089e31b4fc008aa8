"""The Prefect flow: `transfer_pipeline` runs transferops' pipeline as Prefect tasks.

The chain itself is :func:`transferops.pipeline.run.run_pipeline` (one place); this file only
says how a step runs under Prefect: as a task named after the step, with retries for the
steps that can fail transiently, and with Prefect's result cache keyed on the step's
fingerprint (params + data hash + upstream results), refreshed when the outputs on disk no
longer match it. Run it with `transferops run` (ephemeral Prefect, no server) or serve it
as a scheduled deployment with `transferops serve`.
"""

from __future__ import annotations

import logging
import os

# Before Prefect is imported: transferops' logs go to the flow run's logs (and the UI), and
# the offline machines this runs on do not try to send telemetry.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "transferops")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from transferops.config import load_config
from transferops.errors import TransferopsError
from transferops.pipeline.deployment import close_crashed_runs
from transferops.pipeline.run import StepFn, StepKey, run_pipeline
from transferops.runtime.lock import project_lock
from transferops.runtime.tracking import run_link

# Transient failures worth retrying: a locked sqlite store under parallel workers, a hub or
# tracking server that drops a connection. Training steps are deterministic: no retry.
RETRIES = {"pull": 2, "search": 1, "register": 2, "promote": 2}


def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what retrying can fix: never a user error (params, data, credentials)."""
    try:
        state.result()
    except TransferopsError:
        return False
    except Exception:
        return True
    return True


def _cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    return parameters["fingerprint"]  # None: never cached


@task(persist_result=True, result_serializer="json", cache_key_fn=_cache_key)
def pipeline_step(step: str, fingerprint: str | None, fn: StepFn) -> dict[str, Any]:
    """One pipeline step (the task's name is the step's)."""
    return fn()


def _prefect_runner(tracking: Any) -> Any:
    def run_step(step: str, key: StepKey | None, fn: StepFn) -> dict[str, Any]:
        runner = pipeline_step.with_options(
            name=step,
            task_run_name=step,
            retries=RETRIES.get(step, 0),
            retry_delay_seconds=5,
            retry_condition_fn=_transient,
            refresh_cache=key is not None and not key.current,
        )
        result = runner(step, key.fingerprint if key else None, fn)
        if result.get("mlflow_run_id"):
            get_run_logger().info(
                "%s: MLflow run %s", step, run_link(tracking, result["mlflow_run_id"])
            )
        return result

    return run_step


@flow(name="transfer-pipeline", log_prints=True)
def transfer_pipeline(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    project_dir: str | None = None,
) -> dict[str, Any]:
    """prepare -> pull -> search -> train -> baseline -> evaluate -> register -> promote.

    `overrides` are dotted params.yaml keys (e.g. {"finetune.lr": 0.001}), validated by the
    same config models as the file before any step starts. `project_dir`: the folder whose
    relative paths params.yaml names (deployments set it: a worker starts elsewhere).
    """
    if project_dir is not None:
        os.chdir(project_dir)  # a worker runs each flow run in a process of its own
    logging.getLogger("transferops").setLevel(logging.INFO)  # Prefect's handlers show them
    cfg = load_config(Path(params_file), overrides or {})  # preset, then the overrides
    with project_lock("run"):  # run_pipeline takes it again (re-entrant)
        close_crashed_runs("transfer-pipeline", flow_run.id, Path.cwd())
        summary = run_pipeline(cfg, _prefect_runner(cfg.tracking))
    create_markdown_artifact(
        key="transfer-pipeline-summary",
        markdown="\n".join(f"- **{k}**: {v}" for k, v in summary.items()),
        description="transferops pipeline summary",
    )
    return summary
