"""Faults and misuse: what happens when runs collide, services fail, or inputs hide secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from transferops.cli import app
from transferops.lock import project_lock

from .conftest import mlflow_server, write_image_folder

runner = CliRunner()

HOLD = """
import sys, time
from transferops.lock import project_lock
with project_lock("run", sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_run_in_a_folder_is_refused_at_once_and_a_dead_holder_frees_it(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data:\n  demo: null\n  path: nowhere\n")
    holder = _holder(tmp_path)
    try:
        t = time.monotonic()
        r = runner.invoke(app, ["run", "--no-prefect"])
        assert r.exit_code == 2 and time.monotonic() - t < 15
        assert "another transferops run is using" in r.output
        assert f"pid {holder.pid}" in r.output and "(run)" in r.output
        r = runner.invoke(app, ["prepare"])  # every step that writes is refused too
        assert r.exit_code == 2 and f"pid {holder.pid}" in r.output
        assert not (tmp_path / "data").exists()  # refused before doing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the next command runs (and fails on its own
    # merits: the data path does not exist).
    r = runner.invoke(app, ["prepare"])
    assert r.exit_code == 2 and "another transferops run" not in r.output
    assert "nowhere" in r.output


def test_lock_is_reentrant_in_a_process_and_released_after(tmp_path):
    with project_lock("run", tmp_path), project_lock("train", tmp_path):
        pass  # `run` holds it, its steps take it again
    with project_lock("run", tmp_path):
        holder_free = subprocess.run(
            [sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(tmp_path)],
            capture_output=True,
            text=True,
        )
    assert holder_free.returncode == 1 and "LockedError" in holder_free.stderr
    assert "held" not in holder_free.stdout
    with project_lock("run", tmp_path):  # released: taken again
        pass
    assert os.path.exists(tmp_path / ".transferops.lock")


PASSWORD = "Hunter2pw"


def _one_line_error(r, within_s: float, started: float) -> str:
    assert r.exit_code == 2, r.output
    assert time.monotonic() - started < within_s
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tracking.uri=http://127.0.0.1:9", "tracking.uri http://127.0.0.1:9 is not reachable"),
        ("search.storage=foo://x", "search.storage foo://x cannot be opened"),
        (
            f"search.storage=postgresql+psycopg://bob:{PASSWORD}@127.0.0.1:9/db",
            "search.storage postgresql+psycopg://bob:***@127.0.0.1:9/db cannot be opened",
        ),
        ("search.storage=sqlite:///${NOPE_DIR}/o.db", "environment variable NOPE_DIR"),
        ("compute.cluster=tcp://127.0.0.1:9", "compute.cluster tcp://127.0.0.1:9 is not reachable"),
    ],
)
def test_bad_service_urls_fail_in_seconds_with_one_line(tmp_path, monkeypatch, override, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NOPE_DIR", raising=False)
    (tmp_path / "params.yaml").write_text("data:\n  demo: null\n  path: nowhere\n")
    t = time.monotonic()
    r = runner.invoke(app, ["run", "--no-prefect", "--set", override])
    line = _one_line_error(r, 15, t)
    assert expected in line and PASSWORD not in r.output
    assert not (tmp_path / "data").exists()  # checked before the first step


def test_storage_url_from_the_environment_and_masked_everywhere(tmp_path, monkeypatch, caplog):
    from transferops.cli import _overrides_map
    from transferops.progress import setup_logging
    from transferops.redact import expand_env, has_password, mask

    url = f"postgresql+psycopg://bob:{PASSWORD}@db.example:5432/optuna"
    assert mask(url) == "postgresql+psycopg://bob:***@db.example:5432/optuna"
    assert mask("sqlite:///optuna.db") == "sqlite:///optuna.db"
    assert not has_password("postgresql://bob:${PW}@h/db") and has_password(url)
    monkeypatch.setenv("PW", PASSWORD)
    assert expand_env("postgresql://bob:${PW}@h/db", "search.storage") == (
        f"postgresql://bob:{PASSWORD}@h/db"
    )
    # --set with a password reaches Prefect's parameters as an environment placeholder
    overrides = _overrides_map([f"search.storage={url}", "finetune.lr=0.01"])
    assert PASSWORD not in json.dumps(overrides) and overrides["finetune.lr"] == 0.01
    placeholder = overrides["search.storage"]
    assert expand_env(placeholder, "search.storage") == url
    # and the terminal log masks any URL password that a message carries
    import logging

    setup_logging()
    handler = logging.getLogger("transferops").handlers[0]
    record = logging.LogRecord("transferops.x", logging.INFO, "", 0, "opening %s", (url,), None)
    assert handler.filter(record) and record.getMessage() == f"opening {mask(url)}"


def _start_run(folder: Path, *args: str) -> subprocess.Popen:
    env = os.environ | {"TRANSFEROPS_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "transferops.cli", "run", *args],
        cwd=folder,
        env=env,
        start_new_session=True,  # its own process group, like a job in a terminal
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 240) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never appeared:\n{''.join(lines)}")


def _nothing_left_running(folder: Path) -> None:
    import optuna
    from mlflow import MlflowClient

    storage = optuna.storages.RDBStorage(f"sqlite:///{folder / 'optuna.db'}")
    states = [
        t.state for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id)
    ]
    assert optuna.trial.TrialState.RUNNING not in states and states
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("transferops")
    runs = client.search_runs([exp.experiment_id])
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    assert "KILLED" in {r.info.status for r in runs}


SLOW_SEARCH = (
    "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n  limit_per_class: null\n"
    "finetune:\n  epochs_per_stage: [30, 30]\n  batch_size: 4\n"
    "search:\n  n_trials: 4\n"
)


@pytest.mark.parametrize(
    ("sig", "prefect"),
    [
        (signal.SIGINT, False),
        (signal.SIGTERM, False),
        pytest.param(signal.SIGINT, True, marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, True, marks=pytest.mark.slow),
    ],
)
def test_interrupt_during_search_stops_cleanly(tmp_path, sig, prefect):
    write_image_folder(tmp_path / "raw", per_class=12)
    (tmp_path / "params.yaml").write_text(SLOW_SEARCH)
    proc = _start_run(tmp_path, "--prefect" if prefect else "--no-prefect")
    server = None
    try:
        _wait_for(proc, "finished trial(s), target 4")
        time.sleep(3)  # inside the first trial
        server = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        t = time.monotonic()
        # A terminal's Ctrl-C reaches the whole process group; SIGTERM only the process.
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and time.monotonic() - t < 10, out
    assert not [p for p in server or [] if psutil.pid_exists(p)]  # no child outlives it
    assert f"interrupted ({sig.name}) during search; rerun the same command to resume" in out
    assert "Traceback" not in out
    _nothing_left_running(tmp_path)
    assert not (tmp_path / ".transferops.lock").exists() or _lock_is_free(tmp_path)


def test_an_interrupt_waits_until_the_store_write_ends(monkeypatch):
    # raised inside a SQLAlchemy session it left sqlite locked and the clean exit failed
    from transferops import interrupt
    from transferops.critical import critical

    monkeypatch.setitem(interrupt.STATE, "in_handler", False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, interrupt._on_signal)
    written = []
    try:
        with pytest.raises(KeyboardInterrupt), critical():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs meanwhile, inside the block
            written.append("the write ended")
        assert written == ["the write ended"]
        with pytest.raises(KeyboardInterrupt):  # outside a block: at once
            interrupt._on_signal(signal.SIGTERM, None)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _lock_is_free(folder: Path) -> bool:
    with project_lock("check", folder):
        return True


def test_outputs_get_the_umask_modes_not_private_temp_modes(tmp_path, image_folder):
    """Reports, model folders and receipts go through write_json_atomic / atomic_dir, whose
    temp files are created 0600 / 0700: published, they must be readable like any file."""
    import stat

    from transferops.artifacts import DIR_MODE, FILE_MODE, atomic_dir, write_json_atomic
    from transferops.config import validate_config
    from transferops.data import prepare

    write_json_atomic(tmp_path / "r" / "receipt.json", {"a": 1})
    with atomic_dir(tmp_path / "folder") as d:
        (d / "x.txt").write_text("x")
    cfg = validate_config(
        {"data": {"demo": None, "path": str(image_folder), "out": str(tmp_path / "prep")}}
    )
    out = prepare(cfg).out
    assert stat.S_IMODE((tmp_path / "r" / "receipt.json").stat().st_mode) == FILE_MODE
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == DIR_MODE
    assert stat.S_IMODE(out.stat().st_mode) == DIR_MODE
    # safetensors creates its files 0600: the prepared splits (and model weights) too
    written = [p for p in out.iterdir() if p.suffix == ".safetensors"]
    assert written and all(stat.S_IMODE(p.stat().st_mode) == FILE_MODE for p in written)
    assert (
        FILE_MODE & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044
    )  # readable unless the umask says no


@pytest.fixture
def mlflow_url(tmp_path) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (its own sqlite store)."""
    store = tmp_path / "server"
    store.mkdir()
    backend = f"sqlite:///{store / 'mlflow.db'}"
    with mlflow_server(backend, "--default-artifact-root", str(store / "artifacts")) as url:
        yield url


def test_a_password_in_the_tracking_uri_is_written_nowhere(tmp_path, monkeypatch, mlflow_url):
    """The whole pipeline against a real MLflow server whose URI carries a password: not in
    any file under the project, not in any MLflow param, tag or metric name."""
    from mlflow import MlflowClient

    project = tmp_path / "project"
    write_image_folder(project / "raw", per_class=12)
    uri = mlflow_url.replace("http://", f"http://bob:{PASSWORD}@")
    (project / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n  limit_per_class: null\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [1, 1]\n  batch_size: 8\n"
        "search:\n  n_trials: 2\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0, 1]\n  scratch_trials: 2\n  efficiency_per_class: [null]\n"
        f"tracking:\n  uri: {uri}\n"
    )
    monkeypatch.chdir(project)
    r = runner.invoke(app, ["run", "--no-prefect"])
    assert r.exit_code == 0, r.output
    assert PASSWORD not in r.output
    written = [p for p in project.rglob("*") if p.is_file() and p.name != "params.yaml"]
    assert len(written) > 50  # data, models, reports, stamps, MLflow artifacts...
    assert not [p for p in written if PASSWORD.encode() in p.read_bytes()]
    client = MlflowClient(tracking_uri=mlflow_url)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) > 5
    for run in runs:
        fields = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        assert PASSWORD not in fields, run.info.run_name
    for mv in client.search_model_versions():
        assert PASSWORD not in json.dumps([mv.tags, mv.source, mv.description])


def test_a_second_real_run_is_refused_and_the_first_goes_on(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "raw", per_class=12)
    (tmp_path / "params.yaml").write_text(SLOW_SEARCH)
    first = _start_run(tmp_path, "--no-prefect")
    try:
        _wait_for(first, "finished trial(s), target 4")
        monkeypatch.chdir(tmp_path)
        t = time.monotonic()
        r = runner.invoke(app, ["run", "--no-prefect"])
        line = _one_line_error(r, 15, t)
        assert f"pid {first.pid}" in line and "(run)" in line
        time.sleep(2)
        assert first.poll() is None  # unaffected: still searching
        os.killpg(first.pid, signal.SIGINT)
        out, _ = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130 and "interrupted (SIGINT) during search" in out


def test_runs_a_killed_process_left_running_are_closed_and_its_orphan_model_dropped(tmp_path):
    """SIGKILL leaves MLflow runs RUNNING (and, in register, a logged model no version points
    at): the next run closes them KILLED and drops the orphan."""
    import socket

    from mlflow import MlflowClient

    from transferops.config import TrackingConfig
    from transferops.tracking import HOST_TAG, PID_TAG, close_runs, setup_tracking

    cfg = TrackingConfig(
        uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "art")
    )
    setup_tracking(cfg)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment).experiment_id
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    killed = client.create_run(exp, tags={PID_TAG: str(dead.pid), HOST_TAG: host})
    alive = client.create_run(exp, tags={PID_TAG: str(os.getppid()), HOST_TAG: host})
    orphan = client.create_logged_model(exp, source_run_id=killed.info.run_id)
    linked = client.create_logged_model(
        exp,
        source_run_id=killed.info.run_id,
        tags={"mlflow.modelVersions": '[{"name": "m", "version": "1"}]'},
    )
    assert close_runs(cfg) == 1
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process lives
    left = {m.model_id for m in client.search_logged_models(experiment_ids=[exp])}
    assert linked.model_id in left and orphan.model_id not in left
