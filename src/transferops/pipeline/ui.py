"""`transferops ui`: the project's MLflow UI and optuna-dashboard, on 127.0.0.1.

Both read the project's own stores (``tracking.uri``, ``search.storage``; relative sqlite
paths are taken from the folder of the project's params.yaml), so they show this project's
runs and study from wherever the command is started. A tracking server (``tracking.uri:
http://...``) is not started again: its URL is printed. The command waits until both
answer, prints the URLs, and stops them on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from transferops.config import Config
from transferops.errors import ConfigError
from transferops.runtime.redact import expand_env, mask
from transferops.runtime.study_storage import make_storage
from transferops.runtime.tracking import absolute_uri, is_server

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0
# optuna-dashboard's public entry point, with the storage URL from the environment: on the
# command line a database password would be in every `ps` listing
DASHBOARD = (
    "import os, sys; from optuna_dashboard import run_server; "
    "run_server(os.environ['TRANSFEROPS_STUDY_STORAGE'], host=sys.argv[1], port=int(sys.argv[2]))"
)


@dataclass(frozen=True)
class Service:
    """A UI process to start: its command, the URL to open, the URL that says it is up, and
    its store URLs (which may hold a password) as environment, not arguments."""

    name: str
    cmd: list[str]
    url: str
    health: str
    env: dict[str, str] = field(default_factory=dict)


def services(cfg: Config, project: Path, mlflow_port: int, optuna_port: int) -> list[Service]:
    """The UIs this project's params call for (relative sqlite paths are `project`'s, the
    folder of its params.yaml); a study storage that cannot be opened is one line now."""
    make_storage(
        cfg.search.model_copy(update={"storage": absolute_uri(cfg.search.storage, project)})
    )
    out = []
    if not is_server(cfg.tracking.uri):
        store = absolute_uri(expand_env(cfg.tracking.uri, "tracking.uri"), project)
        base = f"http://127.0.0.1:{mlflow_port}"
        cmd = [str(BIN / "mlflow"), "ui", "--host", "127.0.0.1", "--port", str(mlflow_port)]
        cmd += ["--workers", "1"]
        url = base + runs_page(store, cfg.tracking.experiment)
        env = {"MLFLOW_BACKEND_STORE_URI": store}
        out.append(Service("MLflow UI", cmd, url, base + "/health", env))
    storage = absolute_uri(expand_env(cfg.search.storage, "search.storage"), project)
    url = f"http://127.0.0.1:{optuna_port}"
    cmd = [sys.executable, "-c", DASHBOARD, "127.0.0.1", str(optuna_port)]
    env = {"TRANSFEROPS_STUDY_STORAGE": storage}
    out.append(Service("optuna-dashboard", cmd, url, url + "/api/studies", env))
    return out


def runs_page(store: str, experiment: str) -> str:
    """The URL fragment of the experiment's runs table in the model-training view (MLflow 3's
    UI otherwise opens on its GenAI overview: traces, judges, prompts; its router reads
    ``workflowType`` from the hash's query), or "" before the first run made the experiment."""
    from mlflow import MlflowClient  # heavy: only for the command that needs it

    with contextlib.suppress(Exception):
        exp = MlflowClient(store).get_experiment_by_name(experiment)
        if exp is not None:
            return f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    return ""


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(svcs: list[Service]) -> Iterator[list[subprocess.Popen]]:
    """Start every service, wait until each answers; stop them all when the block ends."""
    with contextlib.ExitStack() as stack:
        # stderr to files, not pipes: a UI logs for hours, and a full pipe would block it
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in svcs]
        procs: list[subprocess.Popen] = []
        try:
            with _signals_stop():
                for s, log in zip(svcs, logs, strict=True):
                    # a session of its own: `mlflow ui` runs its server as a child, and the
                    # whole group is stopped (else the worker keeps the port, re-parented)
                    procs.append(
                        subprocess.Popen(
                            s.cmd,
                            stdout=subprocess.DEVNULL,
                            stderr=log,
                            env=os.environ | s.env,
                            text=True,
                            start_new_session=True,
                        )
                    )
                _wait_until_up(svcs, procs, logs)
                yield procs
        finally:
            _stop(procs)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM and SIGHUP (a `kill`, a closed terminal, a job in the background where the
    shell ignores SIGINT) end the command like Ctrl-C, so the UIs are stopped with it."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    before = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _wait_until_up(svcs: list[Service], procs: list[subprocess.Popen], logs: list) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for s, p, log in zip(svcs, procs, logs, strict=True):
        while not _up(s.health):
            if p.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                why = log.read()[-500:]
                cmd = mask(" ".join(s.cmd))
                raise ConfigError(f"{s.name} did not start ({cmd}): {mask(why)}")
            time.sleep(0.5)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Each service's whole process group: SIGTERM, then SIGKILL after 15 s."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # what is left of the group (workers)
