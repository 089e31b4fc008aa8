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
from transferops.runtime.redact import mask
from transferops.runtime.tracking import TIMEOUT_S

log = logging.getLogger(__name__)

FLOW_FILE = Path("transferops") / "pipeline" / "flow.py"  # in the folder holding the package
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
    `pool` (created if missing); its id. The code comes from the folder holding the
    transferops package (site-packages, or src/ of a checkout), so workers on other machines
    need transferops installed at the same path."""
    require_api()
    created = ensure_work_pool(pool)
    if created:
        log.info("created process work pool %r", pool)
    root = Path(flows.__file__).resolve().parents[2]  # transferops/pipeline/flow.py
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
    # apply() registers the deployment as flow.deploy() would, without its listing of the
    # pool's workers (which FastAPI 0.151+ refused with a 422: see the pin in pyproject.toml)
    deployment_id = runner.apply(work_pool_name=pool)
    return str(deployment_id)


def close_crashed_runs(flow_name: str, current_run_id: Any, project: Path) -> int:
    """Mark CRASHED the runs of `flow_name` that Prefect still shows RUNNING though their
    process is gone (a SIGKILL, a power cut: nothing could report the end). A run is gone when
    its process (the ``host:pid`` a runner or worker recorded) is dead on this host, or, with
    no process recorded, when it ran in `project`: the caller holds the project's lock, so no
    other run in this folder is alive. Returns how many runs were closed."""
    import socket

    import psutil
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Crashed

    host = socket.gethostname()
    here = str(project.resolve())

    def gone(run: Any) -> bool:
        pid = run.infrastructure_pid or ""
        if pid:
            where, _, number = pid.rpartition(":")
            return where == host and number.isdigit() and not psutil.pid_exists(int(number))
        return (run.parameters.get("project_dir") or here) == here

    with get_client(sync_client=True) as client:
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
            # newest first, and a bound: a server keeps every run it ever made
            sort=FlowRunSort.START_TIME_DESC,
            limit=200,
        )
        dead = [r for r in running if str(r.id) != str(current_run_id) and gone(r)]
        for run in dead:
            client.set_flow_run_state(
                run.id,
                Crashed(message="its process was gone (killed): closed by the next run"),
                force=True,
            )
    if dead:
        log.warning(
            "closed %d flow run(s) left RUNNING by a stopped process (state CRASHED): %s",
            len(dead),
            ", ".join(r.name for r in dead),
        )
    return len(dead)
