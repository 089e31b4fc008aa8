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
from transferops.runtime.lock import project_lock

from .conftest import assert_written_nowhere, mlflow_server, prefect_server, write_image_folder

runner = CliRunner()

HOLD = """
import sys, time
from transferops.runtime.lock import project_lock
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
    assert os.path.exists(tmp_path / ".transferops.runtime.lock")


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
    from transferops.runtime.progress import setup_logging
    from transferops.runtime.redact import expand_env, has_password, mask

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
        pytest.param(signal.SIGTERM, False, marks=pytest.mark.slow),  # 11 s; SIGINT is fast
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
    assert not (tmp_path / ".transferops.runtime.lock").exists() or _lock_is_free(tmp_path)


def test_an_interrupt_waits_until_the_store_write_ends(monkeypatch):
    # raised inside a SQLAlchemy session it left sqlite locked and the clean exit failed
    from transferops.runtime import interrupt
    from transferops.runtime.critical import critical

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

    from transferops.config import validate_config
    from transferops.data.prepare import prepare
    from transferops.runtime.artifacts import DIR_MODE, FILE_MODE, atomic_dir, write_json_atomic

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


def test_a_reused_model_folder_shares_its_files_and_a_write_to_one_leaves_the_other(
    tmp_path, monkeypatch
):
    """Reused model folders (the search's best, the baseline's runs, train's members) are
    hard links, not copies: a text encoder's 90 MB once. Safe because every output file is
    written into a fresh temp folder or file and renamed, never rewritten in place."""
    from transferops.runtime.artifacts import atomic_dir, copy_folder, read_json, write_json_atomic

    src = tmp_path / "trial"
    with atomic_dir(src) as d:
        (d / "model.safetensors").write_bytes(b"w" * 4096)
        write_json_atomic(d / "model.json", {"seed": 0})
    with atomic_dir(tmp_path / "best") as d:
        copy_folder(src, d)
        write_json_atomic(d / "model.json", {"seed": 0, "mlflow_run_id": "r"})  # labels added
    dst = tmp_path / "best"
    assert (dst / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    assert read_json(src / "model.json") == {"seed": 0}  # the source's spec is its own
    with atomic_dir(dst) as d:  # a retrained model replaces the folder: the source stays
        (d / "model.safetensors").write_bytes(b"x" * 10)
    assert (src / "model.safetensors").read_bytes() == b"w" * 4096
    # a symlinked file (a DVC checkout with symlink cache) is copied, not linked to its target
    (tmp_path / "cache").write_bytes(b"c" * 64)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "model.safetensors").symlink_to(tmp_path / "cache")
    copy_folder(tmp_path / "linked", tmp_path / "from_linked")
    got = tmp_path / "from_linked" / "model.safetensors"
    assert not got.is_symlink() and got.read_bytes() == b"c" * 64
    assert got.stat().st_ino != (tmp_path / "cache").stat().st_ino
    # ... and so is a read-only file (DVC's cache hard-linked into the workspace): its
    # mode stays read-only
    (tmp_path / "cache").chmod(0o444)
    (tmp_path / "hard").mkdir()
    os.link(tmp_path / "cache", tmp_path / "hard" / "model.safetensors")
    with atomic_dir(tmp_path / "from_hard") as d:
        copy_folder(tmp_path / "hard", d)
    copied_cache = (tmp_path / "from_hard" / "model.safetensors").stat().st_ino
    assert copied_cache != (tmp_path / "cache").stat().st_ino
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o444
    # where links are not possible (another file system), the bytes are copied
    monkeypatch.setattr(os, "link", lambda a, b: (_ for _ in ()).throw(OSError(18, "EXDEV")))
    copy_folder(src, tmp_path / "copied")
    copied = tmp_path / "copied" / "model.safetensors"
    assert copied.read_bytes() == b"w" * 4096
    assert copied.stat().st_ino != (src / "model.safetensors").stat().st_ino


@pytest.fixture
def mlflow_url(tmp_path) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (its own sqlite store)."""
    store = tmp_path / "server"
    store.mkdir()
    backend = f"sqlite:///{store / 'mlflow.db'}"
    with mlflow_server(backend, "--default-artifact-root", str(store / "artifacts")) as url:
        yield url


@pytest.mark.slow  # 45 s; CI runs the same checks in test_scale's pipeline against the MLflow
# server on PostgreSQL: this one is for machines without PostgreSQL (an sqlite-backed server)
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
    client = MlflowClient(tracking_uri=mlflow_url)
    # data, models, reports, stamps, MLflow artifacts...
    assert_written_nowhere(PASSWORD, project, client, r.output, 50)


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
    from transferops.runtime.tracking import HOST_TAG, PID_TAG, close_runs, setup_tracking

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


IDLE_EXECUTOR = """
import sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import transferops.cli as cli
pool = ThreadPoolExecutor(2, thread_name_prefix="Uploader")  # like MLflow's artifact repos
pool.submit(time.sleep, 0.1).result()  # its workers now sit idle, waiting for work
if sys.argv[1] == "stuck":  # and a thread that never ends
    threading.Thread(target=time.sleep, args=(3600,), name="stuck-writer").start()
cli.THREADS_JOIN_S = 3.0
sys.argv = ["transferops", "--version"]
cli.entry()
"""


@pytest.mark.parametrize("case", ["idle", "stuck"])
def test_the_command_exits_with_idle_executor_workers_and_names_a_stuck_thread(tmp_path, case):
    t = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", IDLE_EXECUTOR, case],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - t
    assert p.returncode == 0 and "transferops" in p.stdout, p.stderr
    if case == "idle":  # the executor's workers end through the threading exit hooks
        assert took < 20 and "still running" not in p.stderr
    else:  # the bound holds, and the stuck thread is named
        assert "1 thread(s) still running" in p.stderr and "stuck-writer" in p.stderr


@pytest.mark.slow
def test_a_served_schedule_creates_and_completes_a_flow_run(tmp_path):
    """Prefect's own scheduler, on a real server, creates a run of the served deployment from
    its one-minute cron (typed as a user types it, no inner quotes) and the run completes.
    With SQLAlchemy 2.1 the scheduler failed every cycle and no run was ever created."""
    import httpx

    write_image_folder(tmp_path / "raw", per_class=6)
    (tmp_path / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n  limit_per_class: null\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [1, 1]\n  batch_size: 8\n"
        "search:\n  n_trials: 1\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0]\n  scratch_trials: 1\n  linear_probe: false\n"
        "  efficiency_per_class: [null]\n"
    )
    cli = str(Path(sys.executable).parent / "transferops")
    with prefect_server(tmp_path / ".prefect") as env:
        env = env | {
            "TRANSFEROPS_PROGRESS": "0",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        served = subprocess.Popen(
            [cli, "serve", "--set", "schedule.enabled=true", "--set", "schedule.cron=* * * * *"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        runs: list[dict] = []
        try:
            with httpx.Client(base_url=env["PREFECT_API_URL"], timeout=30) as api:
                deadline = time.monotonic() + 420
                while time.monotonic() < deadline and served.poll() is None:
                    # the scheduler creates runs ahead: the first ones are due first
                    body = {"limit": 10, "sort": "EXPECTED_START_TIME_ASC"}
                    runs = api.post("/flow_runs/filter", json=body).json()
                    if any(r["state_type"] == "COMPLETED" for r in runs):
                        break
                    time.sleep(5)
        finally:
            os.killpg(served.pid, signal.SIGTERM)
            _, err = served.communicate(timeout=60)
    done = [r for r in runs if r["state_type"] == "COMPLETED"]
    assert done, (runs, err[-3000:])
    assert done[0]["auto_scheduled"] is True  # the scheduler made it, not a manual trigger
    assert (tmp_path / "models" / "registry.json").exists()


CRASHED_RUNS = """
import os, socket, subprocess, sys
from pathlib import Path
from prefect.client.orchestration import get_client
from transferops.pipeline.deployment import close_crashed_runs

host, project = socket.gethostname(), Path(sys.argv[1])
dead = subprocess.Popen(["true"])
dead.wait()
with get_client(sync_client=True) as c:
    flow_id = c.create_flow_from_name("transfer-pipeline")
    runs = {}
    for name, pid, folder in (
        ("killed", f"{host}:{dead.pid}", str(project)),  # its process is dead: closed
        ("alive", f"{host}:{os.getpid()}", str(project)),  # its process lives: kept
        ("no-pid-here", None, str(project)),  # this folder, under the lock: closed
        ("no-pid-elsewhere", None, "/somewhere/else"),  # another folder: kept
    ):
        body = {
            "flow_id": str(flow_id), "name": name, "parameters": {"project_dir": folder},
            "state": {"type": "RUNNING"},
        }
        r = c._client.post("/flow_runs/", json=body).json()
        if pid:
            c.update_flow_run(r["id"], infrastructure_pid=pid)
        runs[name] = r["id"]
    closed = close_crashed_runs("transfer-pipeline", "current", project)
    states = {n: c.read_flow_run(i).state.type.value for n, i in runs.items()}
print(closed, states)
assert closed == 2 and states == {
    "killed": "CRASHED", "alive": "RUNNING", "no-pid-here": "CRASHED",
    "no-pid-elsewhere": "RUNNING",
}, states
"""


@pytest.mark.slow  # a Prefect API of its own: ~20 s
def test_flow_runs_a_killed_process_left_running_are_marked_crashed(tmp_path):
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    p = subprocess.run(
        [sys.executable, "-c", CRASHED_RUNS, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]


def test_masking_takes_linear_time_and_a_huge_value_gets_its_error_in_seconds(tmp_path):
    """The password pattern had nested scans (200 KB: 43 s, 5 MB: never); the log filter runs
    it on every line."""
    from transferops.runtime.redact import has_password, mask

    for text in ("a" * 5_000_000, "x://" + "a" * 5_000_000, "://u:" * 1_000_000):
        t = time.process_time()
        assert mask(text) == text and not has_password(text)
        assert time.process_time() - t < 10  # linear: ~0.2 s; quadratic: hours
    big = "http://u:pw@h/" + "p" * 5_000_000
    assert mask(big).startswith("http://u:***@h/") and len(mask(big)) == len(big) + 1
    (tmp_path / "params.yaml").write_text(f"data:\n  demo: null\n  path: {'d' * 5_000_000}\n")
    t = time.monotonic()
    p = subprocess.run(
        [str(Path(sys.executable).parent / "transferops"), "prepare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and time.monotonic() - t < 60, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "data.path" in out and "longer than the file system allows" in out
    assert len(out) < 2000 and "Traceback" not in out  # the 5 MB value is not echoed


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "transferops"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"TRANSFEROPS_PROGRESS": "0", "COLUMNS": "200"},
    )


def test_bad_stores_and_params_are_one_line_each(tmp_path):
    """Each case is one `error:` line naming the file or key and the fix, no traceback."""
    (tmp_path / "mlflow.db").write_bytes(b"SQLite format 3\x00" + os.urandom(20_000))
    (tmp_path / "params.yaml").write_text("data:\n  demo: digits\n")
    r = _cli(tmp_path, "promote", "--dry-run")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "mlflow.db" in out and "damaged" in out and "move it aside" in out
    (tmp_path / "mlflow.db").unlink()
    (tmp_path / "params.yaml").write_text("- data\n- source\n")  # a list, not sections
    r = _cli(tmp_path, "prepare", "--set", "data.demo=digits")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "params.yaml: the top level must be a mapping" in out
    (tmp_path / "params.yaml").write_text("data:\n  demo: null\n")
    r = _cli(tmp_path, "prepare", "--set", f"data.path={'x' * 120_000}")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out and len(out) < 2000, out[-3000:]
    assert "data.path" in out and "longer than the file system allows" in out


def test_machine_faults_are_named_wherever_they_surface():
    """A full disk or a damaged sqlite store, raised deep inside a library and re-wrapped."""
    import errno
    import sqlite3

    from transferops.errors import known_fault

    def raised(inner: BaseException, outer: type[Exception]) -> Exception:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise outer("while writing") from exc
        except Exception as exc:
            return exc

    full = raised(OSError(errno.ENOSPC, "No space left", "models/x.tmp"), RuntimeError)
    assert "no space left on device (writing models/x.tmp)" in (known_fault(full) or "")
    sqlite_full = raised(sqlite3.OperationalError("database or disk is full"), ValueError)
    assert "no space left on device" in (known_fault(sqlite_full) or "")
    damaged = raised(sqlite3.DatabaseError("database disk image is malformed"), RuntimeError)
    assert "damaged" in (known_fault(damaged) or "")
    assert known_fault(raised(KeyError("x"), RuntimeError)) is None  # a bug stays a bug


def test_a_symlink_back_into_the_data_is_not_a_class(tmp_path, caplog):
    from transferops.data.readers import read_image_folder

    root = write_image_folder(tmp_path / "raw", per_class=3)
    (root / "loop").symlink_to("..")  # the folder above the data
    (root / "again").symlink_to(root)  # the data folder itself
    (root / "copy").symlink_to(root / "one")  # a class inside it
    elsewhere = write_image_folder(tmp_path / "other", per_class=2, classes=(3,))
    (root / "three").symlink_to(elsewhere / "three")  # outside: a real class
    caplog.set_level("WARNING")
    ds = read_image_folder(root, [".png"])
    assert sorted({e.label for e in ds.examples}) == ["one", "three", "two", "zero"]
    assert "skipped 3 symlinked folder(s)" in caplog.text and "loop -> .." in caplog.text


def test_small_input_fixes(tmp_path):
    """A CSV with a byte-order mark, a 16-bit PNG, a cron string typed as is, transparency."""
    import numpy as np
    from PIL import Image

    from transferops.config import DataConfig, parse_override
    from transferops.data.readers import read_table
    from transferops.model.inputs import decode_image

    table = tmp_path / "t.csv"
    table.write_bytes("\ufefffile,kind\nhello,a\nworld,b\n".encode())
    cfg = DataConfig(
        demo=None, path=table, format="table", table={"text_column": "file", "label_column": "kind"}
    )
    assert [e.text for e in read_table(cfg).examples] == ["hello", "world"]
    grey = np.full((8, 8), 30_000, dtype=np.uint16)  # 46% of the 16-bit range
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    px = decode_image(tmp_path / "g16.png", 8, "crop")
    assert px.shape == (8, 8, 3) and abs(int(px.mean()) - 117) <= 1  # not clipped to 255
    assert parse_override("schedule.cron=* * * * *") == (["schedule", "cron"], "* * * * *")
    # clip art and logos: transparent pixels (here black underneath) show as the page, white
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[2:6, 2:6] = (200, 0, 0, 255)  # an opaque red square on a transparent field
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clip.png")
    px = decode_image(tmp_path / "clip.png", 8, "squash")
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[4, 4]) == (200, 0, 0)
