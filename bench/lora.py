"""LoRA vs the staged full fine-tune on the text benchmark (fortunes, MiniLM), side by side.

The same data, schedule (stages of 3 blocks, 3 epochs each, depth 6) and seed; each variant
at two learning rates, the one with the better val accuracy kept (LoRA usually wants a
larger one). Printed per variant: test accuracy (this bench reads the test split; the
pipeline's search never does), trainable parameters in the deepest stage, seconds per epoch
(wall and CPU), and what is saved (the full model, and for LoRA the adapter alone).

    .venv/bin/python bench/lora.py [--per-class 40] [--out /tmp/lora-bench]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import fortunes_minilm
from transferops.config import Config, validate_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.finetune.adapters import ADAPTER_FILE
from transferops.finetune.thaw import make_trainable
from transferops.finetune.train import build_net, save_finetuned, train_model
from transferops.model.inputs import make_inputs
from transferops.model.predict import predict_probs
from transferops.sources.pull import load_source, pull_from_config

VARIANTS = {"staged full fine-tune": ("none", (1e-3, 3e-3)), "LoRA r=8": ("lora", (3e-3, 1e-2))}


def base_config(root: Path, per_class: int) -> Config:
    finetune = {"unfreeze_depth": 6, "epochs_per_stage": [3, 3], "max_length": 64}
    return validate_config(fortunes_minilm(root, per_class) | {"finetune": finetune})


def trainable(cfg: Config, num_classes: int) -> int:
    """Parameters that train in the deepest stage."""
    net = build_net(load_source(cfg.source.out), num_classes, cfg.finetune)
    make_trainable(net, cfg.finetune.unfreeze_depth, cfg.finetune.adapter)
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def run(cfg: Config, root: Path, name: str) -> dict[str, Any]:
    w, c = time.perf_counter(), time.process_time()
    res, spec = train_model(cfg)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    out = root / name
    save_finetuned(res, spec, out, Path(cfg.source.out))
    test = load_prepared(cfg.data.out, "test")
    probs = predict_probs(
        res.net, spec, make_inputs(test, out, spec["source"], 64), torch.device("cpu")
    )
    adapter = out / ADAPTER_FILE
    return {
        "val": res.best_val_accuracy,
        "test": float((probs.argmax(1) == test.labels.numpy()).mean()),
        "epoch_wall": wall / res.epochs_run,
        "epoch_cpu": cpu / res.epochs_run,
        "model_mb": (out / "model.safetensors").stat().st_size / 1e6,
        "adapter_mb": adapter.stat().st_size / 1e6 if adapter.exists() else None,
        "classes": len(spec["class_names"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-lora-bench"))
    a = ap.parse_args()
    root = a.out.resolve()
    cfg = base_config(root, a.per_class)
    pull_from_config(cfg)
    counts = prepare(cfg).counts
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"fortunes, {a.per_class} per class: {counts}"
    )
    print(
        "\n| variant | lr (best val) | val acc | test acc | trainable params | s/epoch wall | "
        "s/epoch CPU | saved model MB | adapter MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (adapter, lrs) in VARIANTS.items():
        runs = {}
        for lr in lrs:
            c = with_overrides(cfg, {"finetune.adapter": adapter, "finetune.lr": lr})
            runs[lr] = run(c, root, f"{adapter}-{lr}")
        lr, r = max(runs.items(), key=lambda kv: kv[1]["val"])
        n = trainable(with_overrides(cfg, {"finetune.adapter": adapter}), r["classes"])
        adapter_mb = f"{r['adapter_mb']:.2f}" if r["adapter_mb"] else "-"
        print(
            f"| {name} | {lr:g} | {r['val']:.3f} | {r['test']:.3f} | {n:,} | "
            f"{r['epoch_wall']:.1f} | {r['epoch_cpu']:.1f} | {r['model_mb']:.1f} | {adapter_mb} |"
        )


if __name__ == "__main__":
    main()
