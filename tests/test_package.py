"""The package is the product: a wheel built from the repository holds everything `run`,
`serve` and `deploy` need, the Prefect flow included, and works outside the checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from .conftest import REPO

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


def test_a_wheel_holds_the_flow_and_resolves_it_outside_the_checkout(tmp_path):
    checkout = tmp_path / "checkout"  # setuptools writes build/ beside the sources: a copy
    checkout.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, checkout / part)
    shutil.copytree(REPO / "src", checkout / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(checkout)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("transferops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "transferops/pipeline/flow.py" in names and "transferops/__main__.py" in names
    assert not any(n.startswith(("flows/", "tests/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "project"  # no flows/, no checkout around it
    elsewhere.mkdir()
    r = subprocess.run(
        [sys.executable, "-c", RESOLVE, str(site)],
        cwd=elsewhere, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    flow_file, flow_name = r.stdout.split()[-2:]
    assert flow_file == str(site / "transferops" / "pipeline" / "flow.py")
    assert flow_name == "transfer-pipeline"
    r = subprocess.run(
        [sys.executable, "-m", "transferops", "--version"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0 and r.stdout.startswith("transferops "), r.stderr
