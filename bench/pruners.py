"""Search pruners side by side: what multi-fidelity buys on the demo's search.

The demo's search (params.yaml: 10 trials of lr x unfreeze depth, TPE seeded, every trial
starting from the exact probe) with ``search.pruner`` median, hyperband and none, each in its
own fresh project folder (its own study), one after the other: wall and CPU seconds of the
search, trials complete / pruned, the best val accuracy, and the test accuracy of the model
the search keeps (``models/search/best_model``, what `train` copies; test is read here only
to report, never to choose).

    .venv/bin/python bench/pruners.py [--pruners median,hyperband,none] [--out /tmp/pruners]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import torch

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")

from transferops.config import load_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.evaluation.evaluate import predict
from transferops.runtime.artifacts import read_json
from transferops.search.study import run_search
from transferops.sources.pull import pull_from_config

ROOT = Path(__file__).resolve().parents[1]


def run(pruner: str, out: Path) -> dict:
    folder = out / pruner
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    cwd = Path.cwd()
    os.chdir(folder)  # every path in params.yaml is the project folder's
    try:
        cfg = with_overrides(load_config(Path("params.yaml")), {"search.pruner": pruner})
        prepare(cfg)
        pull_from_config(cfg)
        w, c = time.perf_counter(), time.process_time()
        res = run_search(cfg)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        test = load_prepared(cfg.data.out, "test")
        probs = predict(Path(cfg.search.out) / "best_model", test, torch.device("cpu"))
        acc = float((probs.argmax(1) == test.labels.numpy()).mean())
        counts = read_json(Path(cfg.search.out) / "summary.json")["counts"]
    finally:
        os.chdir(cwd)
    return {"wall": wall, "cpu": cpu, "counts": counts, "val": res.best_value, "test": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pruners", default="median,hyperband,none")
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-pruners"))
    args = ap.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| pruner | wall s | CPU s | complete / pruned | best val | its test acc |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = {p: run(p, args.out) for p in args.pruners.split(",")}
    for p, r in rows.items():
        k = r["counts"]
        print(
            f"| {p} | {r['wall']:.0f} | {r['cpu']:.0f} | {k['complete']} / {k['pruned']} | "
            f"{r['val']:.4f} | {r['test']:.3f} |",
            flush=True,
        )
    if "none" in rows:
        base = rows["none"]
        for p, r in rows.items():
            if p != "none":
                print(f"{p}: {base['wall'] / r['wall']:.2f}x the speed of no pruning (wall)")


if __name__ == "__main__":
    main()
