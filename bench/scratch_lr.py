"""The from-scratch arm's lr search: the sampler's seeded draws, or a spread over the range?

`baseline.scratch_trials` (3) trials tune the from-scratch baseline's lr, so the verdict
compares tuned with tuned. Drawn by the seeded sampler, the three lrs were the same on every
dataset (0.0038, 0.0081, 0.0048: a factor 2.1 of the 3e-4..3e-2 range). `spread` starts the
study at the centres of equal log-bins of the range instead, the middle first (0.003, 0.014,
0.00065). This script runs the scratch search of finished quality-benchmark folders both
ways (the configuration their search chose, a study and output folder of its own) and prints
the lrs tried, the best one's val accuracy and its model's test accuracy (read only to
report), with wall and CPU seconds.

    .venv/bin/python bench/scratch_lr.py /tmp/q/digits-k20-auto /tmp/q/folder-9x1300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import optuna
import torch
from _workspace import chosen_config, folder_probs

import transferops.evaluation.baseline as baseline
from transferops.data.prepared import load_prepared
from transferops.runtime.memory import tensor_sized_malloc
from transferops.sources.manifest import read_source_manifest


def run_one(project: Path, how: str, seed: int = 0) -> dict:
    """The scratch search of `project`, started `how` ("seeded draws" or "spread"), its runs
    seeded `seed` (and the sampler too: another draw of both arms)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = chosen_config(project, tmp, {"baseline.seeds": [seed, seed + 1], "search.seed": seed})
        blocks = read_source_manifest(cfg.source.out)["num_blocks"]
        t, c = time.perf_counter(), time.process_time()
        if how == "spread":
            lr = baseline.scratch_lr(cfg, blocks)
        else:
            with patch.object(baseline, "spread", lambda r, n: []):
                lr = baseline.scratch_lr(cfg, blocks)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        (name,) = optuna.get_all_study_names(f"sqlite:///{tmp}/optuna.db")
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/optuna.db")
        tried = [
            f"{t.params['lr']:.2g}{'' if t.state.name == 'COMPLETE' else ' (pruned)'}"
            for t in study.trials
        ]
        folder = Path(tmp) / "baseline" / "scratch_search" / "best_model"
        test = load_prepared(Path(cfg.data.out), "test")
        probs = folder_probs(folder, {"test": test})["test"]
        acc = float((probs.argmax(1) == test.labels.numpy()).mean())
    return {"lr": lr, "val": study.best_value, "test": acc, "tried": tried, "s": (wall, cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="training and sampler seed (a draw)")
    args = ap.parse_args()
    tensor_sized_malloc()
    print(f"# {os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| case | start | lrs tried | best lr | its val acc | its test acc | wall / CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    here = Path.cwd()
    for project in args.projects:
        project = project.resolve()
        os.chdir(project)  # the case's params.yaml holds paths relative to it
        try:
            for how in ("seeded draws", "spread"):
                r = run_one(project, how, args.seed)
                print(
                    f"| {project.name} | {how} | {', '.join(r['tried'])} | {r['lr']:.2g} | "
                    f"{r['val']:.3f} | {r['test']:.3f} | {r['s'][0]:.0f} / {r['s'][1]:.0f} |",
                    flush=True,
                )
        finally:
            os.chdir(here)


if __name__ == "__main__":
    main()
