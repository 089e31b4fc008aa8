"""Scale-out against real servers on 127.0.0.1: a PostgreSQL-backed Optuna study shared by
workers, and an MLflow tracking server on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import optuna
import pytest
from typer.testing import CliRunner

from transferops.cli import app
from transferops.config import validate_config
from transferops.runtime.study_storage import make_storage
from transferops.search.study import run_search

from .conftest import PG_PASSWORD, assert_written_nowhere, mlflow_server, write_image_folder
from .test_search import _raw

TRACKING_PASSWORD = "Hunter2-mlflow"  # in the tracking URI: must leak nowhere

TS = optuna.trial.TrialState


def _kill_first_running_worker(
    storage: optuna.storages.RDBStorage, stop: threading.Event, killed: list
) -> None:
    """SIGKILL the worker process of the first trial seen running (after its first report)."""
    while not stop.is_set() and not killed:
        for name in optuna.get_all_study_names(storage):
            for t in optuna.load_study(study_name=name, storage=storage).trials:
                if t.state == TS.RUNNING and t.intermediate_values and "worker_pid" in t.user_attrs:
                    os.kill(t.user_attrs["worker_pid"], signal.SIGKILL)
                    killed.append(t.number)
                    return
        time.sleep(0.2)


def test_two_dask_workers_on_a_postgresql_study_survive_a_killed_worker(
    tmp_path, digits_prepared, lite0_source, postgres_url
):
    """Trials as tasks of a local Dask cluster sharing a PostgreSQL study: no configuration
    twice, unique numbers, n_trials finished, both workers used; a worker killed mid-trial
    has its trial failed by the heartbeat and retried once with the same params."""
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=6, n_workers=2, pruner="none")
    raw["search"]["sampler"] = "tpe"
    raw["search"]["storage"] = f"{postgres_url}/optuna"
    # trials report from their first thaw on: depth >= 1 and epochs after that first report,
    # so the worker is killed mid-trial
    raw["finetune"]["epochs_per_stage"] = [1, 3]
    raw["search"]["space"]["unfreeze_depth"] = {"low": 1, "high": 2}
    cfg = validate_config(raw)
    stop, killed = threading.Event(), []
    killer = threading.Thread(
        # the schema is made here first: two processes creating it at once collide
        target=_kill_first_running_worker,
        args=(make_storage(cfg.search), stop, killed),
    )
    killer.start()
    try:
        res = run_search(cfg)
    finally:
        stop.set()
        killer.join()
    study = optuna.load_study(study_name=res.study_name, storage=cfg.search.storage)
    trials = study.trials
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    finished = [t for t in trials if t.state in (TS.COMPLETE, TS.PRUNED)]
    assert len(finished) == 6 == res.counts["complete"]
    configs = [tuple(sorted(t.params.items())) for t in finished]
    assert len(configs) == len(set(configs))
    # both workers ran trials (the killed one's is among them: its replacement process may
    # come back only after the other worker has finished the rest)
    assert len({t.user_attrs["worker_pid"] for t in trials if "worker_pid" in t.user_attrs}) >= 2
    assert len(killed) == 1 and trials[killed[0]].state == TS.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].state == TS.COMPLETE
    assert retries[0].params == trials[killed[0]].params
    summary = (tmp_path / "search" / "summary.json").read_text()
    assert PG_PASSWORD not in summary and "transferops:***@127.0.0.1" in summary


@pytest.fixture
def mlflow_on_postgres(tmp_path, postgres_url) -> Iterator[str]:
    """`mlflow server` with its backend on PostgreSQL and proxied artifacts: any machine
    that reaches it can load a registered model."""
    where = str(tmp_path / "server-artifacts")
    backend = f"{postgres_url}/mlflow"
    with mlflow_server(backend, "--artifacts-destination", where, "--serve-artifacts") as url:
        yield url


def test_pipeline_against_an_mlflow_server_on_postgresql(tmp_path, monkeypatch, mlflow_on_postgres):
    """The pipeline with `tracking.uri: http://user:password@...` and the experiment's
    artifacts on the server (proxied): the version, its aliases and the decision are there
    through the REST API; a second registration of the same weights makes no second version;
    the password is in no file under the project and in no MLflow param, tag or metric name."""
    from mlflow import MlflowClient

    uri = mlflow_on_postgres.replace("http://", f"http://bob:{TRACKING_PASSWORD}@")
    project = tmp_path / "project"
    write_image_folder(project / "raw", per_class=12)
    (project / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n  limit_per_class: null\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [1, 1]\n  batch_size: 8\n"
        "search:\n  n_trials: 2\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0, 1]\n  scratch_trials: 2\n  efficiency_per_class: [null]\n"
        "registry:\n  baseline_gate: mean\n  cheap_gate: false\n"
        f"tracking:\n  uri: {uri}\n"  # artifact_location left at its default
    )
    monkeypatch.chdir(project)
    run = CliRunner().invoke(app, ["run", "--no-prefect", "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.output[run.output.rindex("\n{\n") :])
    client = MlflowClient(tracking_uri=mlflow_on_postgres)
    versions = client.search_model_versions("name='transferops-raw'")
    assert [str(v.version) for v in versions] == ["1"] and summary["registered"].endswith("v1")
    aliases = client.get_registered_model("transferops-raw").aliases
    assert aliases.get("challenger") in (1, "1")
    assert ("champion" in aliases) == (summary["champion"] is not None)
    exp = client.get_experiment_by_name("transferops")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # served, not a local path
    # nothing under the project holds the artifacts: they went to the server
    assert not (project / "mlartifacts").exists()
    r = CliRunner().invoke(app, ["register"])
    assert r.exit_code == 0 and "already registered" in r.output
    assert len(client.search_model_versions("name='transferops-raw'")) == 1
    # data, models, reports, stamps (the artifacts went to the server)
    assert_written_nowhere(TRACKING_PASSWORD, project, client, run.output + r.output, 30)


def test_dask_tasks_keep_tensors_off_the_mmap_path(tmp_path, monkeypatch):
    """Dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which made glibc map and unmap
    every tensor anew (training 2.2x slower, bench/RESULTS.md); a task undoes it."""
    from transferops.config import ComputeConfig
    from transferops.runtime.cluster import dask_client, run_in_project, task_context

    def churn() -> int:
        """Minor page faults while 40 tensors of 4 MiB are made and freed."""
        import resource

        import torch

        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(40):
            torch.ones(1 << 20).sum()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    monkeypatch.chdir(tmp_path)
    with dask_client(ComputeConfig(n_workers=1)) as client:
        bare = client.submit(churn, pure=False).result()  # the worker as Dask starts it
        ctx = task_context(client)
        ours = client.submit(run_in_project, ctx, churn, pure=False).result()
    assert bare > 10_000  # ~1,024 faults per tensor: each one freshly mapped
    assert ours < bare / 10
