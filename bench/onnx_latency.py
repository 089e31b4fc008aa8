"""ONNX Runtime vs PyTorch eager: CPU latency of the exported model, side by side.

For an image model (EfficientNet-Lite0 at the demo's 64 px) and a text model (MiniLM,
64 tokens), each fine-tuned for one epoch on the packaged demo data (latency does not
depend on the weights): the median wall milliseconds and the CPU milliseconds per call at
batch 1 and 64, for the PyTorch model (`no_grad`, eval) and the exported ONNX graph (the same
computation: normalisation + network + softmax), interleaved so load affects both alike.

    .venv/bin/python bench/onnx_latency.py [--repeats 30] [--out /tmp/onnx-bench]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transferops.config import validate_config
from transferops.data.prepare import prepare
from transferops.finetune.train import train_from_config
from transferops.model.folder import load_finetuned
from transferops.model.inputs import make_preprocess
from transferops.registry.export import Probabilities, to_onnx
from transferops.sources.pull import pull_from_config

CASES: dict[str, dict[str, Any]] = {
    "image (Lite0, 64 px)": {"data": {"demo": "digits", "image": {"size": 64}}},
    "text (MiniLM, 64 tokens)": {
        "data": {"demo": "fortunes", "format": "table", "path": "raw/fortunes.csv"},
        "source": {
            "kind": "hf",
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "weights": None,
        },
    },
}


def model_folder(root: Path, case: dict[str, Any]) -> Path:
    """A model fine-tuned one epoch (head only) on the case's demo data, under `root`."""
    raw = {
        "data": {"path": "raw/digits", "out": "prep", "limit_per_class": 10} | case["data"],
        "source": {"out": "src"} | case.get("source", {}),
        "finetune": {"unfreeze_depth": 0, "epochs_per_stage": [1], "out": "ft"},
    }
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    cfg = validate_config(raw)
    pull_from_config(cfg)
    prepare(cfg)
    train_from_config(cfg)
    return root / "ft"


def inputs(spec: dict[str, Any], batch: int) -> tuple[torch.Tensor, ...]:
    if spec["modality"] == "text":
        ids = torch.randint(1000, 2000, (batch, 64))
        return ids, torch.ones_like(ids)
    size = spec["image_size"]
    return (torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8),)


def timed(fn: Any, repeats: int) -> tuple[float, float]:
    """Median wall ms and mean CPU ms per call (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    walls, cpu0 = [], time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls) * 1e3, (time.process_time() - cpu0) / repeats * 1e3


def bench(name: str, folder: Path, repeats: int) -> None:
    net, spec = load_finetuned(folder)
    eager = Probabilities(
        net, make_preprocess(spec["source"], torch.device("cpu"), spec["modality"])
    )
    eager = eager.eval()
    path = folder.parent / "model.onnx"
    to_onnx(folder, path, 17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    print(f"\n### {name} ({path.stat().st_size / 1e6:.1f} MB ONNX)\n")
    print(
        "| batch | PyTorch wall ms | PyTorch CPU ms | ONNX Runtime wall ms | ONNX Runtime CPU ms "
        "| speed-up (wall) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in (1, 64):
        x = inputs(spec, batch)
        feed = {n: t.numpy() for n, t in zip(names, x, strict=True)}
        with torch.no_grad():
            ref = eager(*x).numpy()
        assert np.abs(session.run(None, feed)[0] - ref).max() < 1e-4  # same computation
        pt_wall, pt_cpu, ox_wall, ox_cpu = [], [], [], []
        for _ in range(3):  # interleaved rounds: drifting load hits both
            with torch.no_grad():
                w, c = timed(lambda x=x: eager(*x), repeats // 3)
            pt_wall.append(w), pt_cpu.append(c)
            w, c = timed(lambda feed=feed: session.run(None, feed), repeats // 3)
            ox_wall.append(w), ox_cpu.append(c)
        pw, pc = statistics.median(pt_wall), statistics.median(pt_cpu)
        ow, oc = statistics.median(ox_wall), statistics.median(ox_cpu)
        print(f"| {batch} | {pw:.2f} | {pc:.2f} | {ow:.2f} | {oc:.2f} | {pw / ow:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-onnx-bench"))
    a = ap.parse_args()
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {ort.__version__}"
    )
    for i, (name, case) in enumerate(CASES.items()):
        bench(name, model_folder(a.out.resolve() / f"case{i}", case), a.repeats)


if __name__ == "__main__":
    main()
