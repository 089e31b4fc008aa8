"""Scale-out benchmark: what Dask workers and real servers cost or buy, side by side.

1. The same search (``--trials`` trials, fixed depth so every trial costs the same, no
   pruning) with ``compute.n_workers`` 1 (in process) and 2 (a local Dask cluster), each in
   its own folder on the demo data: wall seconds, and CPU seconds of the CLI process and
   all its children (the Dask workers).
2. The whole pipeline (small params) on the embedded defaults (sqlite study, sqlite MLflow
   store) and against a throwaway PostgreSQL + ``mlflow server --serve-artifacts`` on
   127.0.0.1 (needs PostgreSQL's binaries; skipped, and said, without them).

    .venv/bin/python bench/scale_out.py [--trials 8] [--out /tmp/scale-bench]

Every command is a subprocess of the CLI, as a user would run it, one at a time.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import mlflow_server, pg_bindir, postgres_cluster  # noqa: E402

CLI = str(Path(sys.executable).parent / "transferops")
SEARCH = [
    "search.pruner=none",
    "search.sampler=random",
    "search.space.unfreeze_depth={choices: [3]}",  # every trial the same cost
]
PIPELINE = [
    "search.n_trials=4",
    "baseline.seeds=[0, 1]",
    "baseline.efficiency_per_class=[null]",
]


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run `cmd` in `cwd`; (wall s, CPU s of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    env = os.environ | {"TRANSFEROPS_PROGRESS": "0"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def project(out: Path, name: str) -> Path:
    """A fresh project folder with the repo's params.yaml, its data and source ready."""
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", folder)
    for step in ("prepare", "pull"):
        timed([CLI, step], folder)
    return folder


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def bench_search(out: Path, trials: int) -> None:
    rows = []
    for workers in (1, 2):
        folder = project(out, f"search-w{workers}")
        args = [*SEARCH, f"search.n_trials={trials}", f"compute.n_workers={workers}"]
        rows.append((workers, *timed([CLI, "search", *sets(args)], folder)))
    print(f"\n## {trials}-trial search, 1 vs 2 workers (depth 3, no pruning)\n")
    print("| workers | wall s | CPU s (all processes) |\n| --- | --- | --- |")
    for w, wall, cpu in rows:
        print(f"| {w} | {wall:.1f} | {cpu:.1f} |")
    print(
        f"\nspeed-up (wall, 1 -> 2 workers): {rows[0][1] / rows[1][1]:.2f}x; "
        f"CPU ratio: {rows[1][2] / rows[0][2]:.2f}x"
    )


def bench_servers(out: Path) -> None:
    bindir = pg_bindir()
    if bindir is None:
        print("\nPostgreSQL binaries not found: the servers comparison did NOT run")
        return
    embedded = project(out, "pipeline-embedded")
    local = timed([CLI, "run", "--no-prefect", *sets(PIPELINE)], embedded)
    with postgres_cluster(bindir) as pg:
        art = str(out / "server-artifacts")
        with mlflow_server(
            f"{pg}/mlflow", "--artifacts-destination", art, "--serve-artifacts"
        ) as url:
            served = project(out, "pipeline-servers")
            remote = [*PIPELINE, f"search.storage={pg}/optuna", f"tracking.uri={url}"]
            server = timed([CLI, "run", "--no-prefect", *sets(remote)], served)
    print("\n## Whole pipeline: embedded sqlite vs PostgreSQL + MLflow server\n")
    print("| stores | wall s | CPU s (CLI + children; servers not counted) |")
    print("| --- | --- | --- |")
    print(f"| sqlite study + sqlite MLflow | {local[0]:.1f} | {local[1]:.1f} |")
    print(f"| PostgreSQL study + MLflow server on PostgreSQL | {server[0]:.1f} | {server[1]:.1f} |")
    print(f"\noverhead of the servers (wall): {server[0] / local[0]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-scale-bench"))
    ap.add_argument("--skip-servers", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    a = ap.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if not a.skip_search:
        bench_search(a.out, a.trials)
    if not a.skip_servers:
        bench_servers(a.out)


if __name__ == "__main__":
    main()
