"""A moving average of the weights (EMA) beside what fine-tuning keeps today.

Fine-tuning keeps the best epoch, or the uniform average of the last epochs' weights when
that scores better on val (`finetune.average_epochs`). `finetune.ema_halflife` adds an
exponential moving average of the weights, updated every optimizer step, as one more
candidate scored on val when training ends. The average never changes the training
trajectory, so one run gives both models: this script wraps the engine's EMA scoring to
read, on test, the model the run held before the EMA was scored (what ships without it) and
the one after (with it). It trains the configuration each finished quality-benchmark
folder's search chose, for several seeds and half-lives. Test is read only to report.

    .venv/bin/python bench/ema.py /tmp/q/digits-k20-auto /tmp/q/folder-9x1300 \
        --seeds 0,1,2 --halflives 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

import transferops.finetune.engine as engine
from transferops.config import load_config, with_overrides
from transferops.data.prepared import load_prepared
from transferops.finetune.train import train_model
from transferops.model.inputs import make_inputs
from transferops.runtime.memory import tensor_sized_malloc
from transferops.sources.manifest import read_source_manifest


def run_one(project: Path, halflife: float, seed: int) -> dict:
    """Test accuracy of the run's model without and with the EMA candidate."""
    cfg = load_config(project / "params.yaml")
    best = json.loads((project / "models" / "search" / "best_params.json").read_text())
    test = load_prepared(Path(cfg.data.out), "test")
    source = Path(cfg.source.out)
    inputs = make_inputs(test, source, read_source_manifest(source), cfg.finetune.max_length)
    seen: dict = {}
    real = engine.keep_ema

    def test_acc(loop: engine.Loop, state: dict) -> float:
        live = {k: v.clone() for k, v in loop.net.state_dict().items()}
        loop.net.load_state_dict(state)
        bs = inputs.inference_batch(128, loop.pre.size)
        acc, _, _ = engine.val_scores(loop.net, inputs, None, 0, loop.pre, bs, loop.amp)
        loop.net.load_state_dict(live)
        return acc

    def wrapped(loop: engine.Loop, last: engine.Stage, feats: object) -> None:
        seen["without"] = test_acc(loop, loop.run.best_state)
        real(loop, last, feats)
        seen["with"] = test_acc(loop, loop.run.best_state)
        seen["ema"] = dict(loop.run.ema or {})

    with tempfile.TemporaryDirectory() as ck:
        rcfg = with_overrides(
            cfg,
            best
            | {
                "finetune.seed": seed,
                "finetune.ema_halflife": halflife,
                "finetune.checkpoint_dir": ck,
                "finetune.checkpoint_every_s": 10**6,
            },
        )
        engine.keep_ema = wrapped
        try:
            res, _ = train_model(rcfg)
        finally:
            engine.keep_ema = real
    if "without" not in seen:
        raise RuntimeError(f"{project.name}: the EMA was not scored")
    return seen | {"val": res.best_val_accuracy}


def _fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--halflives", default="1,2")
    args = ap.parse_args()
    tensor_sized_malloc()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# {os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        "| case | EMA half-life (epochs) | EMA val acc (per seed) | EMA kept | test acc without "
        "EMA, mean (per seed) | test acc with EMA, mean (per seed) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    here = Path.cwd()
    for project in args.projects:
        project = project.resolve()
        os.chdir(project)  # the case's params.yaml holds paths relative to it
        try:
            for h in [float(x) for x in args.halflives.split(",")]:
                runs = [run_one(project, h, s) for s in seeds]
                without, with_ = [r["without"] for r in runs], [r["with"] for r in runs]
                print(
                    f"| {project.name} | {h:g} | {_fmt([r['ema']['val_accuracy'] for r in runs])}"
                    f" | {sum(r['ema']['kept'] for r in runs)} of {len(runs)} | "
                    f"{np.mean(without):.3f} ({_fmt(without)}) | "
                    f"{np.mean(with_):.3f} ({_fmt(with_)}) |",
                    flush=True,
                )
        finally:
            os.chdir(here)


if __name__ == "__main__":
    main()
