"""`transferops ui`: the project's MLflow UI and optuna-dashboard come up on 127.0.0.1 on
the project's own stores (from another folder too), the study's metric named; Ctrl-C stops
both, on Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest

from .conftest import free_port

CLI = str(Path(sys.executable).parent / "transferops")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.parametrize(
    "sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM]
)
def test_ui_serves_the_projects_runs_and_study_and_stops_on_ctrl_c(tmp_path, sig):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text("tracking:\n  experiment: exp-ui\n")
    study = optuna.create_study(
        study_name="s-ui", storage=f"sqlite:///{project}/optuna.db", direction="maximize"
    )
    study.set_metric_names(["val_accuracy"])
    study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db").create_experiment("exp-ui")
    ports = free_port(), free_port()
    args = ["--params", str(project / "params.yaml"), "--mlflow-port", str(ports[0])]
    proc = subprocess.Popen(
        [CLI, "ui", *args, "--optuna-port", str(ports[1])],
        cwd=project.parent,  # relative sqlite paths are the project's, not the caller's
        env=os.environ | {"COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        while proc.poll() is None and not any("Ctrl-C" in line for line in lines):
            lines.append(proc.stdout.readline())
        shown = "".join(lines)
        assert f"optuna-dashboard: http://127.0.0.1:{ports[1]}" in shown, lines
        runs = "/#/experiments/1/runs?workflowType=machine_learning"  # the model-training view
        assert f"MLflow UI: http://127.0.0.1:{ports[0]}{runs}" in shown
        studies = _get(f"http://127.0.0.1:{ports[1]}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["s-ui"]
        detail = _get(f"http://127.0.0.1:{ports[1]}/api/studies/{studies[0]['study_id']}")
        assert detail["objective_names"] == ["val_accuracy"]
        base = f"http://127.0.0.1:{ports[0]}/ajax-api/2.0/mlflow/experiments/search"
        names = [e["name"] for e in _get(base + "?max_results=10")["experiments"]]
        assert "exp-ui" in names
        # store URLs (a database password) are in the UIs' environment, not in `ps`
        cmdlines = []
        for c in psutil.Process(proc.pid).children(True):
            try:
                cmdlines.append(" ".join(c.cmdline()))
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue  # a short-lived helper that exited meanwhile: no command line to show
        assert len(cmdlines) >= 2 and not any(".db" in c for c in cmdlines), cmdlines
    finally:
        proc.send_signal(sig)  # Ctrl-C, or a `kill` (a job in the background ignores SIGINT)
        assert proc.wait(timeout=30) == 0
    time.sleep(1)
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    assert not set(ports) & listening  # MLflow's uvicorn worker too: the whole group stopped
    for port in ports:  # both UIs are gone with it
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            raise AssertionError(f"port {port} still answers")
        except OSError:
            pass
