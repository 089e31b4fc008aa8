"""The from-scratch arm's BatchNorm statistics: an extra pass over train, or the epoch's own?

The from-scratch baseline learns its BatchNorm statistics (``bn_mode: train``). Before every
validation they were recomputed over one more forward pass of the train split (precise BN,
``finetune.bn_recalibrate: pass``): on 910 training images that pass is a quarter of every
epoch. ``epoch`` averages the statistics of the epoch's own training batches instead (no extra
pass; the weight average still gets one). This script trains the scratch arm of finished
quality-benchmark folders both ways, several seeds, the same lr (the case's tuned scratch lr),
and prints val and test accuracy beside wall and CPU seconds. Test is read only to report.

    .venv/bin/python bench/scratch_bn.py /tmp/q/digits-k20-auto /tmp/q/folder-9x1300 \
        --seeds 0,1,2 --modes pass,epoch
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transferops.config import load_config, with_overrides
from transferops.data.prepared import load_prepared
from transferops.evaluation.baseline import role_overrides
from transferops.finetune.train import train_model
from transferops.model.inputs import make_inputs
from transferops.model.predict import predict_probs
from transferops.runtime.memory import tensor_sized_malloc
from transferops.sources.manifest import read_source_manifest

CPU = torch.device("cpu")


def recorded_scratch(project: Path) -> dict:
    """The finetune params of the case's own scratch-s1 run (its tuned lr and the schedule
    of the configuration the search chose), as overrides; {} when there is none."""
    spec = project / "models" / "baseline" / "scratch-s1" / "model.json"
    if not spec.exists():
        return {}
    ft = json.loads(spec.read_text())["finetune"]
    skip = {"seed", "out", "metrics", "checkpoint_dir", "bn_recalibrate"}
    return {f"finetune.{k}": v for k, v in ft.items() if k not in skip}


def run_one(project: Path, mode: str, seed: int) -> dict:
    """One scratch run of `project` with `finetune.bn_recalibrate: mode`."""
    cfg = load_config(project / "params.yaml")
    blocks = read_source_manifest(Path(cfg.source.out))["num_blocks"]
    with tempfile.TemporaryDirectory() as ck:
        rcfg = with_overrides(
            cfg,
            role_overrides(cfg, "scratch", seed, blocks)
            | recorded_scratch(project)
            | {
                "finetune.bn_recalibrate": mode,
                "finetune.checkpoint_dir": ck,
                "finetune.checkpoint_every_s": 10**6,
            },
        )
        t, c = time.perf_counter(), time.process_time()
        res, spec = train_model(rcfg)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    test = load_prepared(Path(cfg.data.out), "test")
    inputs = make_inputs(test, Path(cfg.source.out), spec["source"], cfg.finetune.max_length)
    probs = predict_probs(res.net.eval(), spec | {"temperature": 1.0}, inputs, CPU)
    acc = float((probs.argmax(1) == test.labels.numpy()).mean())
    return {"val": res.best_val_accuracy, "test": acc, "wall": wall, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="pass,epoch")
    args = ap.parse_args()
    tensor_sized_malloc()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# {os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        "| case | train | bn_recalibrate | val acc, mean (per seed) | test acc, mean (per seed) "
        "| wall / CPU s per run, mean |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    here = Path.cwd()
    for project in args.projects:
        project = project.resolve()
        os.chdir(project)  # the case's params.yaml holds paths relative to it
        n_train = len(load_prepared(Path(load_config("params.yaml").data.out), "train").labels)
        for mode in args.modes.split(","):
            runs = [run_one(project, mode, s) for s in seeds]
            val, test = [r["val"] for r in runs], [r["test"] for r in runs]
            print(
                f"| {project.name} | {n_train} | {mode} | {np.mean(val):.3f} "
                f"({', '.join(f'{v:.3f}' for v in val)}) | {np.mean(test):.3f} "
                f"({', '.join(f'{v:.3f}' for v in test)}) | "
                f"{np.mean([r['wall'] for r in runs]):.1f} / "
                f"{np.mean([r['cpu'] for r in runs]):.1f} |",
                flush=True,
            )
        os.chdir(here)


if __name__ == "__main__":
    main()
