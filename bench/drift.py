"""What the drift check costs, and what it says, on the digits demo at 64 px.

A reference is saved from the demo's training split (all of it: `data.limit_per_class:
null`), then new examples arrive twice: fresh scans of the same kind (the demo's test
images copied in as new training files) and the same scans brightened. For each: the
decision, MMD² and p-value, and the wall and CPU seconds of saving the reference and of
the check (feature pass over the training split + the permutation tests).

    .venv/bin/python bench/drift.py [--out /tmp/drift-bench]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")

from transferops.config import validate_config
from transferops.data.prepare import prepare
from transferops.evaluation.drift import decide_retrain, save_reference
from transferops.sources.pull import pull_from_config


def timed(fn: Any) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def add_new(raw: Path, pool: list[Path], prefix: str, bright: bool) -> int:
    """Copy `pool` images into their class folders as new files (brightened if asked)."""
    for p in pool:
        img = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
        if bright:
            img = np.clip(img * 0.5 + 120, 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(raw / p.parent.name / f"{prefix}{p.stem}.png")
    return len(pool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-drift-bench"))
    ap.add_argument("--new-per-class", type=int, default=10)
    a = ap.parse_args()
    root = a.out.resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    os.chdir(root)
    cfg = validate_config({"data": {"limit_per_class": None}, "schedule": {"retrain": "on_drift"}})
    pull_from_config(cfg)
    counts = prepare(cfg).counts
    raw = Path(cfg.data.path)
    # held-out scans: a random few per class taken out now, to arrive later as "new data"
    rng = np.random.default_rng(0)
    held = [
        p
        for d in sorted(raw.iterdir())
        for p in rng.permutation(sorted(d.iterdir()))[: a.new_per_class]
    ]
    stash = root / "held"
    for p in held:
        (stash / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.move(p, stash / p.parent.name / p.name)
    held = sorted(stash.rglob("*.png"))
    counts = prepare(cfg).counts
    print(f"machine: {platform.node()}, {os.cpu_count()} cores; digits 64 px: {counts}")
    _, w, c = timed(lambda: save_reference(cfg))
    print(
        "\n| step | decision | MMD² | p | wall s | CPU s |\n| --- | --- | --- | --- | --- | --- |"
    )
    print(
        f"| save the reference ({counts['train']} train images) | - | - | - | {w:.1f} | {c:.1f} |"
    )
    for label, bright in (("fresh scans", False), ("brightened scans", True)):
        add_new(raw, held, "new-bright-" if bright else "new-", bright)
        prepare(cfg)
        d, w, c = timed(lambda: decide_retrain(cfg))
        drift = d["drift"] or {}
        verdict = "retrain" if d["retrain"] else "skip"
        print(
            f"| check: +{len(held)} {label} | {verdict} | {drift.get('mmd2', 0):.4f} | "
            f"{drift.get('p_value', 1):.3f} | {w:.1f} | {c:.1f} |"
        )
        for p in raw.rglob("new-*.png"):  # each case against the same reference
            p.unlink()


if __name__ == "__main__":
    main()
