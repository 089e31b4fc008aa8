"""The package is the product: a wheel built from the repository holds everything `run`,
`serve` and `deploy` need, the Prefect flow included, and works outside the checkout."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, write_image_folder

RESOLVE = """
import sys
sys.path.insert(0, sys.argv[1])  # the unpacked wheel before the checkout's editable install
import transferops
from transferops import cli
assert transferops.__file__.startswith(sys.argv[1]), transferops.__file__
flows = cli._flow_module()
print(flows.__file__)
print(flows.transfer_pipeline.name)
"""


def _build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the repository (setuptools writes build/ beside
    the sources); the wheel."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, checkout / part)
    shutil.copytree(REPO / "src", checkout / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(checkout),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("transferops-*.whl")
    return wheel


def test_a_wheel_holds_the_flow_and_resolves_it_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "transferops/pipeline/flow.py" in names and "transferops/__main__.py" in names
    assert "transferops/pipeline/templates/params.yaml" in names  # what `init` writes
    assert not any(n.startswith(("flows/", "tests/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "project"  # no flows/, no checkout around it
    elsewhere.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", RESOLVE, str(site)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    flow_file, flow_name = r.stdout.split()[-2:]
    assert flow_file == str(site / "transferops" / "pipeline" / "flow.py")
    assert flow_name == "transfer-pipeline"
    r = subprocess.run(
        [sys.executable, "-m", "transferops", "--version"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.startswith("transferops "), r.stderr


TINY = [
    "data.image.size=16",
    "source.sizes=null",  # no 32-px candidate: the tiny run stays tiny
    "finetune.unfreeze_depth=1",
    "finetune.epochs_per_stage=[1, 1]",
    "finetune.batch_size=8",
    "search.n_trials=1",
    "search.space.unfreeze_depth={low: 0, high: 1}",
    "baseline.seeds=[0]",
    "baseline.scratch_trials=1",
    "baseline.linear_probe=false",
    "baseline.efficiency_per_class=[null]",
    "export.onnx=false",
]


@pytest.mark.slow
def test_install_the_wheel_init_a_project_and_run_it_outside_the_checkout(tmp_path):
    """The README's "Start a project", as a new user types it: the wheel installed into a
    fresh virtual environment (the heavy dependencies reused from this one), then `transferops
    init` next to an image folder and a short `transferops run` (the Prefect flow, from the
    package) in a folder with no checkout around it."""
    dist = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the heavy dependencies (torch, MLflow, Prefect...) from this environment, after the
    # venv's own site-packages: the installed wheel's transferops comes first
    (own,) = (venv / "lib").glob("python3*/site-packages")
    (own / "_heavy_deps.pth").write_text(site.getsitepackages()[0] + "\n")
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(dist)],
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    project = tmp_path / "my-project"
    write_image_folder(project / "images", per_class=6)
    cli = str(venv / "bin" / "transferops")
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "PREFECT_API_URL": "",
        "TRANSFEROPS_PROGRESS": "0",
        "COLUMNS": "200",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PYTHONPATH", None)  # the venv's own transferops, nothing else
    r = subprocess.run(
        [cli, "init", "--data", "images"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "next: transferops run" in r.stdout + r.stderr, r.stderr
    sets = [a for s in TINY for a in ("--set", s)]
    r = subprocess.run(
        [cli, "run", *sets], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "for flow 'transfer-pipeline'" in log and "registered" in log
    flow_file = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import transferops.pipeline.flow as f; print(f.__file__)",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert flow_file.startswith(str(venv)), flow_file  # the installed wheel's flow ran
    assert (project / "models" / "registry.json").exists()
