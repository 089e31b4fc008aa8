"""Same-padding benchmark: EfficientNet-Lite0 as the package builds it (a zero-pad module
before every "same" conv) against its symmetric pads folded into the convs
(`model.blocks.fold_same_padding`, what transferops trains and serves).

A training step (forward + backward, every block trainable) and an inference batch, channels
last as transferops runs them, side by side in one process; wall and CPU ms, best of
`--repeat` rounds of 5.

    .venv/bin/python bench/same_padding.py [--size 64] [--batch-size 64] [--repeat 3]

Results go to bench/RESULTS.md by hand, with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from transferops.model.blocks import fold_same_padding
from transferops.model.families import build_architecture


def timed(fn: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Best (wall, CPU) ms per call over `repeat` rounds of 5 calls (after one warm-up)."""
    fn()
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        for _ in range(5):
            fn()
        best = min(best, ((time.perf_counter() - w) * 200, (time.process_time() - c) * 200))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    padded, _ = build_architecture("efficientnet_lite", "efficientnet-lite0", args.size)
    folded, _ = build_architecture("efficientnet_lite", "efficientnet-lite0", args.size)
    folded.load_state_dict(padded.state_dict())
    n = fold_same_padding(folded)
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    x = x.contiguous(memory_format=torch.channels_last)

    def step(m: nn.Module) -> Callable[[], None]:
        return lambda: m.train()(x).sum().backward()

    def infer(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                m.eval()(x)

        return run

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.size} px, batch {args.batch_size}, {n} pads folded"
    )
    print("| what | padding | wall ms | CPU ms | ratio (wall) |")
    print("| --- | --- | --- | --- | --- |")
    for what, make in (("train step", step), ("inference", infer)):
        rows = {}
        for name, m in (("zero-pad module", padded), ("folded", folded)):
            rows[name] = timed(make(m.to(memory_format=torch.channels_last)), args.repeat)
        base = rows["zero-pad module"][0]
        for name, (w, c) in rows.items():
            print(f"| {what} | {name} | {w:.0f} | {c:.0f} | {base / w:.2f}x |")


if __name__ == "__main__":
    main()
