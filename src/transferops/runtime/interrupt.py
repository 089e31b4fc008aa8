"""Ctrl-C and SIGTERM: stop in seconds, leave nothing RUNNING, say how to resume.

On either signal during a command that writes: the Prefect flow run (if any) is marked
Cancelled, child processes (search workers, Prefect's temporary server) are stopped, the
Optuna trials this process or its children were running are failed, their MLflow runs are
marked KILLED; one line says where it stopped, and the process exits 130. What finished
before stays: step outputs and checkpoints are written atomically, so rerunning the same
command resumes. A second Ctrl-C during the clean-up is ignored (it takes a few seconds).

Where the clean-up runs matters. When the main thread does the work (every command without
Prefect), the signal becomes a KeyboardInterrupt: the stack unwinds first (open database
transactions roll back, MLflow and Optuna close what they opened), then :func:`finish`
runs; cleaning up inside the handler instead could wait forever on a sqlite lock that the
interrupted code itself holds. Inside a per-epoch store write the KeyboardInterrupt waits for
the write to end (:mod:`transferops.runtime.critical`): raised within a SQLAlchemy session it left
sqlite locked. Under Prefect the main thread only waits for the task thread and Prefect would
spend minutes reporting to its (dying) server: there the handler cleans up and exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Any, NoReturn

import psutil

from transferops.config import Config
from transferops.runtime.critical import defer_interrupt
from transferops.runtime.tracking import close_runs

log = logging.getLogger(__name__)

STATE: dict[str, Any] = {"step": None, "cfg": None, "workers": set()}  # what it reports and cleans
CHILD_GRACE_S = 3.0


def at_step(step: str, cfg: Config | None = None) -> None:
    """Record the step under way (and its config) for the interrupt message and clean-up."""
    STATE["step"] = step
    if cfg is not None:
        STATE["cfg"] = cfg


class _QuietInterrupt(logging.Filter):
    """Optuna logs the trial an interrupt stops as a failure, traceback included: the one
    line :func:`finish` prints says it better."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is KeyboardInterrupt)


def install(command: str, in_handler: bool = False) -> None:
    """Handle SIGINT and SIGTERM for the rest of this command (main thread only);
    `in_handler`: clean up in the signal handler itself (the Prefect door)."""
    at_step(command)
    STATE["in_handler"] = in_handler
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    quiet = logging.getLogger("optuna.study._optimize")  # the logger of the trial-failed line
    if not any(isinstance(f, _QuietInterrupt) for f in quiet.filters):
        quiet.addFilter(_QuietInterrupt())


def _on_signal(signum: int, frame: Any) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    STATE["signal"] = signal.Signals(signum).name
    if STATE.get("in_handler"):
        finish()
    if defer_interrupt():  # inside a store write: raised when it ends (runtime.critical)
        return
    raise KeyboardInterrupt


def finish() -> NoReturn:
    """After an interrupt: stop children, fail their trials, close MLflow runs, say where
    it stopped, exit 130."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    me = psutil.Process()
    children = me.children(recursive=True)
    # A local Dask cluster may already be closed by the unwinding: its workers' pids were noted
    pids = {me.pid, *(c.pid for c in children), *STATE["workers"]}
    _cancel_prefect_flow_run()
    _stop(children)
    cfg = STATE["cfg"]
    if cfg is not None:
        _fail_trials(cfg, pids)
        _close_mlflow_runs(cfg)
    print(
        f"interrupted ({STATE.get('signal', 'SIGINT')}) during {STATE['step']}; rerun the "
        "same command to resume",
        file=sys.stderr,
        flush=True,
    )
    os._exit(130)


def _cancel_prefect_flow_run() -> None:
    """Mark the flow run Cancelled while Prefect's API still answers (best effort)."""
    with contextlib.suppress(Exception):
        from prefect.client.orchestration import get_client
        from prefect.context import FlowRunContext
        from prefect.states import Cancelled

        ctx = FlowRunContext.get()
        if ctx is not None and ctx.flow_run is not None:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(
                    ctx.flow_run.id, Cancelled(message="interrupted"), force=True
                )


def _stop(children: list[psutil.Process]) -> None:
    """SIGTERM the children, SIGKILL those still alive after a grace period."""
    for c in children:
        with contextlib.suppress(psutil.Error):
            c.terminate()
    _, alive = psutil.wait_procs(children, timeout=CHILD_GRACE_S)
    for c in alive:
        with contextlib.suppress(psutil.Error):
            c.kill()


def _fail_trials(cfg: Config, pids: set[int]) -> None:
    """FAIL the RUNNING Optuna trials whose worker is one of `pids` (best effort)."""
    with contextlib.suppress(Exception):
        import optuna  # imported when a signal comes: `transferops --help` stays quick

        from transferops.runtime.study_storage import make_storage

        storage = make_storage(cfg.search)
        for study in storage.get_all_studies():
            running = storage.get_all_trials(
                study._study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
            )
            for t in running:
                if t.user_attrs.get("worker_pid") in pids:
                    storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def _close_mlflow_runs(cfg: Config) -> None:
    with contextlib.suppress(Exception):
        close_runs(cfg.tracking, own_pid=os.getpid())
