"""The Prefect door: `transferops run` runs the `transfer-pipeline` flow in Prefect's
ephemeral mode (no server to start), end to end on tiny real data, and a second run takes
the unchanged steps from Prefect's cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import prefect_server, write_image_folder

CLI = str(Path(sys.executable).parent / "transferops")


def _run(
    cwd: Path, *args: str, timeout: int = 400, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = (
        os.environ
        | {
            "PREFECT_HOME": str(cwd / ".prefect"),  # its own ephemeral database and result cache
            "PREFECT_API_URL": "",
            "TRANSFEROPS_PROGRESS": "0",
            "COLUMNS": "200",
        }
        | (env or {})
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project: params.yaml and an image folder (the flow comes from the package)."""
    write_image_folder(tmp_path / "raw", per_class=10)
    (tmp_path / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n  limit_per_class: null\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [2, 1]\n  batch_size: 8\n"
        "search:\n  n_trials: 2\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0, 1]\n  scratch_trials: 2\n  linear_probe: false\n"
        "  efficiency_per_class: [null]\n"
    )
    return tmp_path


def test_run_is_a_prefect_flow_and_unchanged_steps_are_cached(project):
    first = _run(project, "run", "--json")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = first.stdout + first.stderr
    assert "Beginning flow run" in log and "for flow 'transfer-pipeline'" in log
    for step in ("prepare", "pull", "search", "train", "baseline", "evaluate", "register"):
        assert f"Task run '{step}' - Finished in state Completed()" in log, step
    # a local store: no server runs, so the line says how to open the page
    assert "(`transferops ui`, then http://127.0.0.1:5000/#/experiments/" in log
    summary = json.loads(first.stdout)  # the summary alone is on stdout; the logs on stderr
    assert summary["registered"] == "transferops-raw v1"

    second = _run(project, "run", "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    log2 = second.stdout + second.stderr
    for step in ("search", "train", "baseline", "evaluate"):
        assert f"Task run '{step}' - Finished in state Cached(type=COMPLETED)" in log2, step
    again = json.loads(second.stdout)
    assert {k: v for k, v in again.items() if k != "promotion"} == {
        k: v for k, v in summary.items() if k != "promotion"
    }

    # A params edit invalidates exactly the steps that read it: evaluate only.
    params = (project / "params.yaml").read_text() + "evaluate:\n  ece_bins: 5\n"
    (project / "params.yaml").write_text(params)
    third = _run(project, "run")
    log3 = third.stdout + third.stderr
    assert third.returncode == 0, third.stderr[-3000:]
    for step in ("search", "train", "baseline"):
        assert f"Task run '{step}' - Finished in state Cached(type=COMPLETED)" in log3, step
    assert "Task run 'evaluate' - Finished in state Completed()" in log3


@pytest.mark.slow  # two full flow runs, ~50 s: the cached runs above keep the fast suite's
def test_new_data_reruns_every_step_after_it_and_registers_a_new_version(project):
    """New labelled images arrive (what a scheduled run finds): everything downstream of the
    data reruns, and the retrained model is registered as a new version."""
    first = _run(project, "run", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    write_image_folder(project / "raw", per_class=13)  # 000-009 unchanged, 010-012 new
    fourth = _run(project, "run", "--json")
    log4 = fourth.stdout + fourth.stderr
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    for step in ("search", "train", "baseline", "evaluate", "register"):
        assert f"Task run '{step}' - Finished in state Completed()" in log4, step
    new = json.loads(fourth.stdout)
    assert new["data_hash"] != summary["data_hash"] and new["counts"] != summary["counts"]
    assert new["registered"] == "transferops-raw v2"


def test_bad_params_fail_before_prefect_starts(project):
    r = _run(project, "run", "--set", "finetune.lr=-1")
    assert r.returncode == 2
    assert "finetune.lr" in r.stdout + r.stderr
    assert "Beginning flow run" not in r.stdout + r.stderr


@pytest.mark.slow  # 19 s: a second flow run with a tiny startup timeout
def test_a_slow_ephemeral_prefect_server_falls_back_to_the_same_steps(project):
    """Under load Prefect's temporary server can miss its start-up deadline: one warning that
    names the setting, then the same steps run without Prefect (nothing had run yet)."""
    slow = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    cheap = ["baseline.seeds=[0]", "baseline.scratch_trials=0", "search.n_trials=1"]
    r = _run(project, "run", *(a for c in cheap for a in ("--set", c)), env=slow, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in out, out[-2000:]
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in out
    assert "running the same steps without Prefect" in out and "Beginning flow run" not in out
    assert "registered" in r.stdout and (project / "reports" / "metrics.json").exists()


def test_user_errors_are_not_retried_under_prefect():
    """A bad param or credential fails the same way on every retry: Prefect must not retry
    it (the issue measured 536 s and 1,046 lines for one unreachable URL); a transient
    error is retried."""
    from prefect.states import Failed

    from transferops.cli import _flow_module
    from transferops.errors import ConfigError

    _transient = _flow_module()._transient

    assert _transient(None, None, Failed(data=ConfigError("search.storage ..."))) is False
    assert _transient(None, None, Failed(data=OSError("database is locked"))) is True


def test_a_deployment_on_a_work_pool_runs_on_a_worker(project):
    """`transferops deploy` against a real Prefect server: the deployment (cron schedule,
    project parameters) on a process work pool; a run is picked up by `prefect worker
    start` and completes, and its log in the API carries transferops' own lines."""
    import httpx

    prefect = str(Path(sys.executable).parent / "prefect")
    with prefect_server(project / ".prefect") as env:
        env = env | {"TRANSFEROPS_PROGRESS": "0", "COLUMNS": "200"}
        env.pop("MLFLOW_TRACKING_URI", None)

        def sh(*cmd: str, cwd: Path = project) -> subprocess.CompletedProcess:
            r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            return r

        sh(CLI, "deploy", "--pool", "pool-t", "--set", "schedule.enabled=true")
        out = sh(prefect, "deployment", "run", "transfer-pipeline/transferops").stdout
        run_id = out.split("/runs/flow-run/")[1].split()[0]
        # a worker started elsewhere: the run's parameters bring it to the project
        sh(prefect, "worker", "start", "--pool", "pool-t", "--run-once", cwd=project.parent)

        with httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30) as api:
            dep = api.get("/deployments/name/transfer-pipeline/transferops").json()
            run = api.get(f"/flow_runs/{run_id}").json()
            body = {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": 0}
            logs = api.post("/logs/filter", json=body).json()
    assert dep["work_pool_name"] == "pool-t"
    assert dep["parameters"]["project_dir"] == str(project.resolve())
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * 1"]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    names = {log["name"] for log in logs}
    assert {"transferops.evaluation.evaluate", "transferops.registry.promote"} <= names, names
    assert (project / "models" / "registry.json").exists()  # written in the project folder
