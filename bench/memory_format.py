"""Memory-format benchmark: the same fine-tunes in NCHW (contiguous) and channels_last (NHWC).

Side by side in one process on the built-in digits demo (20 labelled per class, the demo's
64 px) with the real EfficientNet-Lite0 weights: a transfer run (staged to depth 6, frozen
prefix cached), a from-scratch run (random init, every block trained, BatchNorm learned) and
inference over val, each timed in wall and CPU seconds with both memory formats.

    .venv/bin/python bench/memory_format.py [--device cpu|cuda] [--size 64] [--repeats 2]

Prints a table and the ratios; results go to bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import replace

import torch

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")

from _workspace import digits_workspace

from transferops.config import FinetuneConfig
from transferops.finetune.engine import finetune
from transferops.finetune.train import build_net
from transferops.model.inputs import make_preprocess, pick_device
from transferops.sources.pull import load_source, random_init

RUNS = {
    "transfer (depth 6, cached)": FinetuneConfig(unfreeze_depth=6, early_stopping_patience=None),
    "scratch (all 9 blocks)": FinetuneConfig(
        unfreeze_depth=9,
        blocks_per_stage=9,
        epochs_per_stage=[1, 8],
        init="random",
        head_init="random",
        bn_mode="train",
        layer_decay=1.0,
        early_stopping_patience=None,
    ),
}


def _clock(fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(*args); CPU counts every thread of this process."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    cfg, train, val = digits_workspace(args.size, limit_per_class=20)
    device = pick_device(args.device)
    src = load_source(cfg.source.out, args.size)
    nchw = replace(make_preprocess(src.manifest, device, "image"), channels_last=False)
    formats = {"NCHW": nchw, "channels_last": replace(nchw, channels_last=True)}

    def net_for(fc: FinetuneConfig):
        source = load_source(cfg.source.out, args.size)
        return build_net(random_init(source) if fc.init == "random" else source, 10, fc, args.size)

    def fit(fc: FinetuneConfig, pre) -> None:
        finetune(net_for(fc), train, val, fc, pre, device)

    def infer(pre) -> None:
        net = net_for(FinetuneConfig())
        if pre.channels_last:
            net.to(memory_format=torch.channels_last)
        net.to(device).eval()
        with torch.no_grad():
            for _ in range(5):
                for i in range(0, len(val), 256):  # predict_probs' batch size
                    net(pre(val.x[i : i + 256].to(device), False, None), None)

    jobs = {name: (lambda pre, fc=fc: fit(fc, pre)) for name, fc in RUNS.items()}
    jobs["inference over val x5"] = infer
    rows = []
    for name, job in jobs.items():
        for pre in formats.values():
            job(replace(pre))  # warm-up: kernel selection and thread pools are not timed
        # alternated, so a noisy neighbour hits both formats alike; the best of the repeats
        times: dict[str, list] = {f: [] for f in formats}
        for _ in range(args.repeats):
            for f, pre in formats.items():
                times[f].append(_clock(job, pre))
        rows.append((name, min(times["NCHW"]), min(times["channels_last"])))

    print(
        f"machine: {platform.node()} | {platform.processor() or platform.machine()} | "
        f"torch {torch.__version__} | device {device} | threads {torch.get_num_threads()}"
    )
    print(f"data: digits demo, train {len(train)} / val {len(val)} at {args.size}px")
    print("| run | NCHW wall / CPU (s) | channels_last wall / CPU (s) | NCHW / channels_last |")
    print("| --- | --- | --- | --- |")
    for name, (w0, c0), (w1, c1) in rows:
        print(f"| {name} | {w0:.1f} / {c0:.1f} | {w1:.1f} / {c1:.1f} | {w0 / w1:.2f}x |")


if __name__ == "__main__":
    main()
