"""Text padding benchmark: batches padded to the split's longest text vs to their own.

Side by side in one process on the packaged fortunes texts with the packaged MiniLM-L6:
inference over every text (what evaluate, serving and the feature cache do) and one training
epoch of the top blocks (forward + backward, random batches). "split" pads every batch to the
longest text in the split (transferops before per-batch padding); "batch" cuts each batch to
its longest text, orders texts by length for inference, and for training groups each chunk of
16 shuffled batches by length (`Inputs.train_order`). Two text sets: the fortunes
(long, many truncated at max_length) and their first lines (short glosses).

    .venv/bin/python bench/text_padding.py [--max-length 64] [--rows 2000]

Prints wall and CPU seconds per configuration and the ratio; results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transferops.config import SourceConfig
from transferops.data.demo import write_demo
from transferops.model.families import build_staged
from transferops.model.inputs import Inputs, tokenize
from transferops.model.predict import predict_probs
from transferops.sources.pull import load_source, pull

CPU = torch.device("cpu")


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _train_epoch(net, data: Inputs, depth: int, bs: int = 32) -> None:
    frozen = net.num_blocks - depth
    opt = torch.optim.AdamW([p for b in net.blocks[frozen:] for p in b.parameters()], lr=1e-5)
    perm = data.train_order(
        torch.randperm(len(data), generator=torch.Generator().manual_seed(0)), bs
    )
    for i in range(0, len(data), bs):
        idx = perm[i : i + bs]
        x, ctx = data.batch(idx)
        with torch.no_grad():
            h = net.encode(x, frozen, ctx)
        loss = F.cross_entropy(net.decode(h, frozen, ctx), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _measure(work: str, data: Inputs, src_dir: Path, depth: int) -> tuple[float, float]:
    torch.manual_seed(0)
    source = load_source(src_dir)
    net = build_staged(source.model, source.family, 5).eval()
    if work == "inference":
        spec = {"source": source.manifest, "modality": "text", "class_names": list("abcde")}
        return _timed(lambda: predict_probs(net, spec, data, CPU, 64))
    return _timed(lambda: _train_epoch(net, data, depth))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.rows} texts, max_length {args.max_length}"
    )
    print(
        "| texts | mean / max tokens | work | split pad (s wall / cpu) "
        "| batch pad (s wall / cpu) | split / batch (wall) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        src_dir = Path(tmp) / "src"
        pull(SourceConfig(kind="hf", name="sentence-transformers/all-MiniLM-L6-v2", out=src_dir))
        manifest = load_source(src_dir).manifest
        df = pd.read_csv(write_demo("fortunes", Path(tmp) / "raw")).sample(
            n=args.rows, random_state=0
        )
        sets = {"fortunes": df.text.tolist(), "first lines": [t.splitlines()[0] for t in df.text]}
        for name, texts in sets.items():
            ids, mask = tokenize(texts, src_dir, manifest, args.max_length)
            y = torch.randint(0, 5, (len(texts),))
            per_batch = Inputs(ids, y, mask)
            split = Inputs(ids, y, mask, lengths=torch.full((len(texts),), ids.shape[1]))
            lens = per_batch.lengths.float()
            for work in ("inference", f"train epoch, depth {args.depth}"):
                (sw, sc), (bw, bc) = (
                    _measure(work, data, src_dir, args.depth) for data in (split, per_batch)
                )
                print(
                    f"| {name} | {lens.mean():.0f} / {lens.max():.0f} | {work} "
                    f"| {sw:.1f} / {sc:.1f} | {bw:.1f} / {bc:.1f} | {sw / bw:.1f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
