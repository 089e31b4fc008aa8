"""Feature-cache benchmark: staged training with vs without the frozen-prefix cache.

Measured side by side in one process on the built-in digits demo with the real
EfficientNet-Lite0 weights, against the bare reference: one forward pass of the backbone over
train + val (what a linear probe should cost, whatever its epoch count).

    .venv/bin/python bench/feature_cache.py [--device cpu|cuda] [--size 32] [--epochs 5]

Prints a table and the ratios; results go to bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import nullcontext

import torch

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")

from _workspace import digits_workspace

from transferops.config import FinetuneConfig
from transferops.finetune.cache import encode_prefix
from transferops.finetune.engine import finetune
from transferops.finetune.train import build_net
from transferops.model.inputs import Inputs, make_preprocess, pick_device
from transferops.sources.pull import load_source


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    cfg, train, val = digits_workspace(args.size)
    device = pick_device(args.device)
    src = load_source(cfg.source.out, args.size)

    def run(depth: int, epochs: int, cache: bool) -> float:
        fc = FinetuneConfig(
            unfreeze_depth=depth,
            blocks_per_stage=depth or 1,
            epochs_per_stage=[epochs],
            feature_cache=cache,
            early_stopping_patience=None,
            batch_size=args.batch_size,
        )
        net = build_net(load_source(cfg.source.out, args.size), 10, fc, args.size)
        pre = make_preprocess(src.manifest, device, "image", fc.augment)
        _sync(device)
        t = time.perf_counter()
        finetune(net, train, val, fc, pre, device)
        _sync(device)
        return time.perf_counter() - t

    # Warm-up: every configuration once, untimed, so no row pays for kernel selection,
    # lazy CUDA module loading or thread-pool start-up that the others then reuse.
    for depth in (0, 3):
        for cache in (True, False):
            run(depth, 1, cache)

    # Bare reference: one backbone forward pass over train + val, with the engine's autocast,
    # timed after a warm-up pass.
    fc = FinetuneConfig()
    net = build_net(src, 10, fc, args.size)
    pre = make_preprocess(src.manifest, device, "image", fc.augment)
    both = Inputs(torch.cat([train.x, val.x]), torch.cat([train.y, val.y])).to(device)
    amp = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda"
        else nullcontext
    )
    pre.place(net, device)
    times = []
    for _ in range(2):
        _sync(device)
        t = time.perf_counter()
        encode_prefix(net, both, net.num_blocks, pre, args.batch_size * 2, amp=amp)
        _sync(device)
        times.append(time.perf_counter() - t)
    bare = times[-1]

    rows = []
    for depth, epochs in ((0, args.epochs), (0, 4 * args.epochs), (3, args.epochs)):
        with_cache, without = run(depth, epochs, True), run(depth, epochs, False)
        rows.append((depth, epochs, with_cache, without))

    print(
        f"machine: {platform.node()} | {platform.processor() or platform.machine()} | "
        f"torch {torch.__version__} | device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
        + f" | threads {torch.get_num_threads()}"
    )
    print(
        f"data: digits demo, train {len(train)} / val {len(val)} at {args.size}px; "
        f"batch {args.batch_size}; depth 3 = 2 stages (head, then 3 blocks)"
    )
    print(f"bare backbone forward over train+val: {bare:.2f}s")
    print(
        "| unfreeze depth | epochs/stage | cached (s) | uncached (s) | uncached / cached "
        "| cached / bare fwd |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for depth, epochs, c, u in rows:
        print(f"| {depth} | {epochs} | {c:.2f} | {u:.2f} | {u / c:.1f}x | {c / bare:.2f} |")


if __name__ == "__main__":
    main()
