"""BLAS-threads benchmark: sklearn's logistic-regression fits with numpy/scipy's BLAS on every
core (the default) against one thread (`logreg.serial_blas`, what transferops uses).

The two fits the pipeline makes, on the digits demo (64 px, 20 per class, Lite0's features):
the exact probe's regularisation path (`probe.C_GRID`, warm-started as `fit_probe` does) and
the classical baseline (logistic regression on raw pixels, as `evaluate` fits it). Side by
side in one process, wall and CPU seconds, best of `--repeat`.

    .venv/bin/python bench/blas_threads.py [--repeat 3]

Results go to bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_info, threadpool_limits

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")

from _workspace import digits_workspace

from transferops.finetune.cache import encode_prefix
from transferops.finetune.probe import C_GRID
from transferops.finetune.train import build_net
from transferops.model.inputs import make_preprocess
from transferops.sources.pull import load_source


def probe_path(x: np.ndarray, y: np.ndarray) -> None:
    clf = LogisticRegression(max_iter=1000, warm_start=True)
    for c in C_GRID:
        clf.set_params(C=c).fit(x, y)


def classical(x: np.ndarray, y: np.ndarray) -> None:
    LogisticRegression(max_iter=2000).fit(x, y)


def timed(fn: Callable[[], None], threads: int | None, repeat: int) -> tuple[float, float]:
    """Best (wall, CPU) seconds of `repeat` calls with BLAS limited to `threads`."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        with threadpool_limits(limits=threads, user_api="blas"):
            w, c = time.perf_counter(), time.process_time()
            fn()
            best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)

    cfg, train, _ = digits_workspace(64, limit_per_class=20)
    src = load_source(cfg.source.out, 64)
    net = build_net(src, 10, cfg.finetune, 64).eval()
    pre = make_preprocess(src.manifest, torch.device("cpu"), "image")
    pre.place(net, torch.device("cpu"))
    feats = encode_prefix(net, train, net.num_blocks, pre, 128).double().numpy()
    pixels = train.x.flatten(1).float().numpy() / 255
    y = train.y.numpy()
    cores = os.cpu_count()
    blas = {i["internal_api"] for i in threadpool_info() if i["user_api"] == "blas"}
    print(f"# {platform.processor() or platform.machine()}, {cores} cores, BLAS {blas}")
    print(f"# features {feats.shape}, pixels {pixels.shape}, best of {args.repeat}")
    print("| fit | BLAS threads | wall s | CPU s | ratio (wall) |")
    print("| --- | --- | --- | --- | --- |")
    for name, fn in (
        ("probe path (6 C)", lambda: probe_path(feats, y)),
        ("classical (pixels)", lambda: classical(pixels, y)),
    ):
        many = timed(fn, None, args.repeat)
        one = timed(fn, 1, args.repeat)
        print(f"| {name} | {cores} (default) | {many[0]:.2f} | {many[1]:.2f} | 1.00 |")
        print(f"| {name} | 1 | {one[0]:.2f} | {one[1]:.2f} | {many[0] / one[0]:.1f}x faster |")


if __name__ == "__main__":
    main()
