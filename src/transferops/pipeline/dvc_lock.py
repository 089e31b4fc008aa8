"""After a whole run by another door (`transferops run`, the Prefect flow): record in dvc.lock
what it produced, as `dvc repro` would have.

Without this, `dvc status` calls every stage changed after `transferops run`, `dvc repro`
redoes them all, and `dvc metrics diff` has no lock to compare. Recorded only in a DVC
project (``.dvc/`` and ``dvc.yaml`` in the folder) and only when the run's params are
params.yaml's own: a ``--set`` run did not produce what params.yaml describes.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from transferops.config import Config, load_config

log = logging.getLogger(__name__)


def dvc_binary() -> str | None:
    """The dvc next to this Python (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else shutil.which("dvc")


def stages_to_record(cfg: Config, ran: list[str], dvc_yaml: Path) -> list[str]:
    """The dvc.yaml stages among the steps that ran (demo_data too when its folder is there)."""
    stages = yaml.safe_load(dvc_yaml.read_text()).get("stages", {})
    targets = [s for s in ran if s in stages]
    demo = stages.get("demo_data", {})
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in demo.get("outs", [])]
    if cfg.data.demo and outs and all(Path(o).exists() for o in outs):
        targets.insert(0, "demo_data")
    return targets


def record_run(cfg: Config, ran: list[str], params_file: Path = Path("params.yaml")) -> bool:
    """`dvc commit` the stages of the steps that `ran`; whether dvc.lock was written. Never
    fails the run: a problem is one warning saying what `dvc status` will show."""
    dvc_yaml, dvc = Path("dvc.yaml"), dvc_binary()
    if not (Path(".dvc").is_dir() and dvc_yaml.is_file() and params_file.is_file() and dvc):
        return False
    if load_config(params_file).model_dump(mode="json") != cfg.model_dump(mode="json"):
        log.info("dvc.lock not updated: this run's params are not params.yaml's (--set)")
        return False
    targets = stages_to_record(cfg, ran, dvc_yaml)
    # not --quiet: it hides the reason of a failure too
    done = subprocess.run([dvc, "commit", "--force", *targets], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [x.strip() for x in (done.stderr + "\n" + done.stdout).splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("ERROR")]
        why = (errors or lines or [f"dvc commit exited {done.returncode}"])[-1]
        log.warning("dvc.lock not updated (dvc status will call the stages changed): %s", why)
        return False
    log.info("dvc.lock: recorded %s (dvc status is clean)", ", ".join(targets))
    return True
