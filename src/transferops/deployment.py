"""Prefect deployments of the `transfer-pipeline` flow: served from this process
(`transferops serve`, one machine) or on a process work pool that `prefect worker start`
processes poll (`transferops deploy`, any number of machines).

Both carry the cron schedule of ``schedule:`` (when enabled) and the flow parameters: the
project folder, its params.yaml and the ``--set`` overrides, so a run started by a worker or
by the schedule is the run `transferops run` would make in that folder.
"""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron, Schedule
from prefect.settings import PREFECT_API_URL

from transferops.config import Config
from transferops.errors import ConfigError
from transferops.redact import mask
from transferops.tracking import TIMEOUT_S

log = logging.getLogger(__name__)

FLOW_FILE = Path("flows") / "transfer_pipeline.py"
# A worker runs each flow run in a fresh process: these make transferops' own lines (steps,
# trials, the promotion decision) part of the run's log in the Prefect UI, and keep the
# offline machines from sending telemetry.
WORKER_ENV = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "transferops",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TRANSFEROPS_PROGRESS": "0",
}


def schedules(cfg: Config) -> list[Schedule]:
    """The deployment's schedules: ``schedule.cron`` when ``schedule.enabled``."""
    sc = cfg.schedule
    return [Cron(sc.cron, timezone=sc.timezone)] if sc.enabled else []


def describe(cfg: Config) -> str:
    """One line: when the deployment runs."""
    sc = cfg.schedule
    if sc.enabled:
        return f"cron {sc.cron!r} ({sc.timezone})"
    return "no schedule (schedule.enabled is false); runs start by hand"


def flow_parameters(params: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """What every run of the deployment gets: absolute paths, so a worker started in any
    folder runs in this project."""
    return {
        "params_file": str(params.resolve()),
        "overrides": overrides,
        "project_dir": str(Path.cwd().resolve()),
    }


def require_api() -> str:
    """The Prefect API URL, answering ``/health``; else one line saying how to start it."""
    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError(
            "a work-pool deployment needs a Prefect server: start one (prefect server start "
            "--host 127.0.0.1) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=TIMEOUT_S) as r:
            r.read()
    except OSError as exc:
        raise ConfigError(
            f"PREFECT_API_URL {mask(url)} is not reachable ({getattr(exc, 'reason', exc)}): "
            "start the server (prefect server start --host 127.0.0.1) or fix the URL"
        ) from None
    return url


def ensure_work_pool(pool: str) -> bool:
    """Create the process work pool `pool` unless it exists; whether it was created."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            return True


def deploy(
    cfg: Config,
    flows: ModuleType,
    name: str,
    pool: str,
    params: Path,
    overrides: dict[str, Any],
) -> str:
    """Create or update deployment ``transfer-pipeline/<name>`` on process work pool
    `pool` (created if missing); its id. The code comes from the folder holding
    flows/transfer_pipeline.py, so workers on other machines need it at the same path."""
    require_api()
    created = ensure_work_pool(pool)
    if created:
        log.info("created process work pool %r", pool)
    root = Path(flows.__file__).resolve().parents[1]
    flow = flows.transfer_pipeline.from_source(
        source=str(root), entrypoint=f"{FLOW_FILE.as_posix()}:transfer_pipeline"
    )
    runner = flow.to_deployment(
        name=name,
        schedules=schedules(cfg),
        parameters=flow_parameters(params, overrides),
        job_variables={"env": WORKER_ENV},
        tags=["transferops"],
    )
    # Not flow.deploy(): it also lists the pool's online workers, a request Prefect 3.8's own
    # server refuses (422: a null limit); apply() registers the same deployment
    deployment_id = runner.apply(work_pool_name=pool)
    return str(deployment_id)
