"""Scale-out against real servers on 127.0.0.1: a PostgreSQL-backed Optuna study shared by
workers, and an MLflow tracking server on PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator

import optuna
import pytest
from typer.testing import CliRunner

from transferops.cli import app
from transferops.config import validate_config
from transferops.search import run_search

from .conftest import PG_PASSWORD, mlflow_server, write_image_folder
from .test_search import _raw

TS = optuna.trial.TrialState


def test_two_workers_on_a_postgresql_study_never_repeat_a_configuration(
    tmp_path, digits_prepared, lite0_source, postgres_url
):
    raw = _raw(tmp_path, digits_prepared, lite0_source, n_trials=6, n_workers=2, pruner="none")
    raw["search"]["sampler"] = "tpe"
    raw["search"]["storage"] = f"{postgres_url}/optuna"
    raw["finetune"]["epochs_per_stage"] = [1]
    cfg = validate_config(raw)
    res = run_search(cfg)
    study = optuna.load_study(study_name=res.study_name, storage=cfg.search.storage)
    trials = study.trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))
    complete = [t for t in trials if t.state == TS.COMPLETE]
    assert len(complete) >= 6 == res.counts["complete"] - (len(complete) - 6)
    configs = [tuple(sorted(t.params.items())) for t in complete]
    assert len(configs) == len(set(configs))  # each worker draws its own sequence
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2  # both workers worked
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
    """The pipeline with `tracking.uri: http://...` and the experiment's artifacts on the
    server (proxied): the version, its aliases and the decision are there through the
    REST API; a second registration of the same weights makes no second version."""
    from mlflow import MlflowClient

    project = tmp_path / "project"
    write_image_folder(project / "raw", per_class=12)
    (project / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n  limit_per_class: null\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [1, 1]\n  batch_size: 8\n"
        "search:\n  n_trials: 2\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0, 1]\n  efficiency_per_class: [null]\n"
        "registry:\n  baseline_gate: mean\n  cheap_gate: false\n"
        f"tracking:\n  uri: {mlflow_on_postgres}\n"  # artifact_location left at its default
    )
    monkeypatch.chdir(project)
    r = CliRunner().invoke(app, ["run", "--no-prefect", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.rindex("\n{\n") :])
    client = MlflowClient(tracking_uri=mlflow_on_postgres)
    versions = client.search_model_versions("name='transferops-demo'")
    assert [str(v.version) for v in versions] == ["1"] and summary["registered"].endswith("v1")
    aliases = client.get_registered_model("transferops-demo").aliases
    assert aliases.get("challenger") in (1, "1")
    assert ("champion" in aliases) == (summary["champion"] is not None)
    exp = client.get_experiment_by_name("transferops")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # served, not a local path
    # nothing under the project holds the artifacts: they went to the server
    assert not (project / "mlartifacts").exists()
    r = CliRunner().invoke(app, ["register"])
    assert r.exit_code == 0 and "already registered" in r.output
    assert len(client.search_model_versions("name='transferops-demo'")) == 1
