"""Inference batch size on the CPU: EfficientNet-Lite0 (folded pads, channels last, eval mode,
no grad, as transferops validates, probes and predicts) over 269 images at several sizes, in
batches of 128 (what validation used: 2x the training batch) against
`Inputs.inference_batch` (about 4096 / image side), side by side in one process; wall and
CPU s per pass over the 269 images, best of `--repeat`.

    .venv/bin/python bench/eval_batch.py [--sizes 32 64 128] [--repeat 3]

Results go to bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from transferops.model.blocks import fold_same_padding
from transferops.model.families import build_architecture
from transferops.model.inputs import Inputs
from transferops.runtime.memory import tensor_sized_malloc

N = 269  # the demo's val split


def best_pass(net: torch.nn.Module, x: torch.Tensor, bs: int, repeat: int) -> tuple[float, float]:
    """Best (wall, CPU) seconds of one no-grad pass over `x` in batches of `bs`."""
    best = (float("inf"), float("inf"))
    with torch.no_grad():
        for r in range(repeat + 1):  # the first round warms up
            w, c = time.perf_counter(), time.process_time()
            for i in range(0, len(x), bs):
                net(x[i : i + bs])
            if r:
                best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tensor_sized_malloc()
    torch.manual_seed(0)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| size | batch 128: wall / CPU s | inference_batch | wall / CPU s | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for size in args.sizes:
        net, _ = build_architecture("efficientnet_lite", "efficientnet-lite0", size)
        fold_same_padding(net)
        net = net.eval().to(memory_format=torch.channels_last)
        x = torch.randn(N, 3, size, size).contiguous(memory_format=torch.channels_last)
        bs = Inputs(x, torch.zeros(N, dtype=torch.long)).inference_batch(128)
        old, new = best_pass(net, x, 128, args.repeat), best_pass(net, x, bs, args.repeat)
        print(
            f"| {size} | {old[0]:.3f} / {old[1]:.3f} | {bs} | {new[0]:.3f} / {new[1]:.3f} "
            f"| {old[0] / new[0]:.2f}x |"
        )


if __name__ == "__main__":
    main()
