"""The DVC door (`dvc repro` in a temporary git repo) and the CLI door for prepare."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from transferops.cli import app

from .conftest import REPO, write_image_folder

BIN = Path(sys.executable).parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def _dvc_repo(tmp_path: Path, stages: list[str]) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["image"]["size"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"] = {k: v for k, v in dvc["stages"].items() if k in stages}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")
    _run(["git", "init", "-q"], repo)
    _run([str(BIN / "dvc"), "init", "-q"], repo)
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo)
    return repo


def test_dvc_repro_prepare_then_noop_then_param_change(tmp_path):
    repo = _dvc_repo(tmp_path, ["demo_data", "prepare"])
    dvc = str(BIN / "dvc")
    out = _run([dvc, "repro"], repo)
    assert "Running stage 'prepare'" in out
    manifest = repo / "data" / "prepared" / "manifest.json"
    assert manifest.exists() and (repo / "dvc.lock").exists()
    h1 = manifest.read_text()
    out = _run([dvc, "repro"], repo)
    assert "Running stage" not in out and "didn't change" in out
    # A data.* param edit reruns prepare only.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["splits"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([dvc, "repro"], repo)
    assert "Running stage 'prepare'" in out and "Running stage 'demo_data'" not in out
    assert manifest.read_text() != h1
    # A param prepare does not read leaves it alone.
    params["finetune"]["lr"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage" not in _run([dvc, "status"], repo)
    assert "prepare" not in _run([dvc, "status"], repo)


def test_dvc_yaml_prepare_params_are_exactly_what_prepare_reads():
    from transferops.config import DataConfig
    from transferops.data.prepare import _prepare_params

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    listed = {p.removeprefix("data.") for p in stage["params"]}
    assert listed == set(_prepare_params(DataConfig()))


runner = CliRunner()


def test_cli_prepare_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "imgs", per_class=8)
    (tmp_path / "params.yaml").write_text("data:\n  demo: null\n  path: imgs\n")
    r = runner.invoke(app, ["prepare", "--set", "data.image.size=8", "--limit-per-class", "2"])
    assert r.exit_code == 0, r.output
    assert "written" in r.output and "train=6" in r.output
    assert r.output.count("data hash") == 1  # the result once (it was logged and printed)
    r = runner.invoke(app, ["prepare", "--set", "data.image.size=8", "--limit-per-class", "2"])
    assert r.exit_code == 0 and r.output.count("up to date") == 1


def test_cli_version():
    from importlib.metadata import version

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"transferops {version('transferops')}"


def test_cli_bad_input_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data:\n  demo: null\n  path: missing\n")
    r = runner.invoke(app, ["prepare", "--set", "data.splits.train=0.9"])
    assert r.exit_code == 2
    assert "data.splits" in r.output and "sum to 1" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["prepare", "--set", "data.demo=null", "--set", "data.path=missing"])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_dvc_yaml_train_params_cover_what_training_reads():
    from transferops.config import FinetuneConfig

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    listed = {p.removeprefix("finetune.") for p in stage["params"]}
    # Output locations are deps/outs of the stage, not params that change the result; the
    # classical model may be what train writes
    assert listed == set(FinetuneConfig.model_fields) - FinetuneConfig.OUTPUT_FIELDS | {
        "registry.classical_candidate",
        "registry.metric",  # the classical model is compared with fine-tuning by it
    }


def test_dvc_train_stage_reads_the_search_output():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "--overrides-file ${search.out}/best_params.json" in stages["train"]["cmd"]
    assert "${search.out}/best_params.json" in stages["train"]["deps"]
    assert stages["search"]["outs"] == ["${search.out}"]


def test_dockerfile_installs_like_the_readme_and_runs_the_pipeline():
    """No Docker engine here: check the image uses the README's setup and run commands."""
    docker = (REPO / "Dockerfile").read_text()
    readme = (REPO / "README.md").read_text()
    runs = [ln for ln in docker.splitlines() if ln.startswith("RUN ")]
    assert any(ln.startswith("RUN make setup") for ln in runs)
    assert "```bash\nmake setup\n```" in readme
    assert 'CMD ["transferops", "run"]' in docker and "make run" in readme
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "data", "models", "mlflow.db"} <= set(ignored)  # no weights or data


def test_dvc_plots_render_offline(tmp_path):
    """`dvc plots show` on the repo's dvc.yaml: every declared plot is drawn, and the page
    loads nothing from the network (DVC's Vega plots would fetch their scripts from a CDN)."""
    repo = _dvc_repo(tmp_path, [])
    plots = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    for p in plots:  # the charts evaluate writes, here as small real PNGs
        path = repo / p.replace("${evaluate.out}", "reports")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), "white").save(path)
    _run([str(BIN / "dvc"), "plots", "show", "-o", "out"], repo)
    html = (repo / "out" / "index.html").read_text()
    assert "http://" not in html and "https://" not in html
    assert html.count("<img") == len(plots) == 4


def _new_store_output(tmp_path, env: dict[str, str]) -> str:
    code = (
        "from transferops.config import TrackingConfig\n"
        "from transferops.runtime.tracking import setup_tracking\n"
        "setup_tracking(TrackingConfig(uri='sqlite:///mlflow.db'))\n"
    )
    tmp_path.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


@pytest.mark.slow  # 12 s: two full CLI runs for their log lines
def test_third_party_noise_is_off_unless_verbose(tmp_path, monkeypatch):
    # MLflow announces every new store; transferops -v shows it, the default does not
    quiet = _new_store_output(tmp_path / "a", {"TRANSFEROPS_VERBOSE": "0"})
    loud = _new_store_output(tmp_path / "b", {"TRANSFEROPS_VERBOSE": "1"})
    assert "Creating initial MLflow database tables" in loud
    assert "Creating initial MLflow database tables" not in quiet
    monkeypatch.setenv("TRANSFEROPS_VERBOSE", "0")  # restored after: -v writes os.environ
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["-v", "prepare", "--help"]).exit_code == 0
    assert os.environ["TRANSFEROPS_VERBOSE"] == "1"


def test_a_run_by_another_door_is_recorded_in_dvc_lock(tmp_path, monkeypatch, caplog):
    from transferops.config import load_config, with_overrides
    from transferops.data.prepare import prepare
    from transferops.pipeline.dvc_lock import record_run

    repo = _dvc_repo(tmp_path, ["demo_data", "prepare"])
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", _env()["PATH"])
    cfg = load_config(repo / "params.yaml")
    prepare(cfg)  # what `transferops run` does, not `dvc repro`
    dvc = str(BIN / "dvc")
    assert "changed" in _run([dvc, "status"], repo)  # DVC knows nothing of it yet
    # a --set run did not produce what params.yaml describes: not recorded
    assert not record_run(with_overrides(cfg, {"data.splits.seed": 7}), ["prepare", "search"])
    assert not (repo / "dvc.lock").exists()
    assert record_run(cfg, ["prepare", "search"])  # search: not a stage of this dvc.yaml
    assert "up to date" in _run([dvc, "status"], repo)
    out = _run([dvc, "repro"], repo)
    assert "Running stage" not in out and "didn't change" in out
    # when dvc cannot record, the warning says why (not "?")
    shutil.rmtree(repo / "data" / "prepared")
    caplog.set_level("WARNING")
    assert not record_run(cfg, ["prepare"])
    assert "dvc.lock not updated" in caplog.text and "ERROR" in caplog.text, caplog.text


EXIT_PROBE = """
import atexit, sys, threading, time
from transferops.cli import entry
trace = sys.argv[1]
def late_writer():  # a worker thread still writing when the command returns
    time.sleep(0.5)
    open(trace, "a").write("thread ")
threading.Thread(target=late_writer).start()
atexit.register(lambda: open(trace, "a").write("handler"))
sys.argv = ["transferops", *sys.argv[2:]]
entry()
"""


def test_the_command_exits_quickly_but_runs_every_exit_handler(tmp_path):
    trace = tmp_path / "trace"
    (tmp_path / "params.yaml").write_text("data:\n  demo: null\n")
    for args, code in (
        (["--version"], 0),
        (["prepare", "--set", "data.demo=null", "--set", "data.path=missing"], 2),
    ):
        trace.write_text("")
        p = subprocess.run(
            [sys.executable, "-c", EXIT_PROBE, str(trace), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == code, p.stderr
        assert trace.read_text() == "thread handler"  # joined, then the handlers, then exit
    assert "does not exist" in p.stdout + p.stderr  # the error still reaches the user
