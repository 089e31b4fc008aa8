"""Register the exact probe unless fine-tuning beats it on val beyond noise? Checked offline.

The registered fine-tuned model is the pick of the search among noisy val scores; the exact
probe is deterministic and cheaper. This script reads finished ``bench/quality.py`` project
folders and, for each, scores the registered candidate (``models/finetuned``) and the exact
probe arm (``models/baseline/probe-s0``) on val and test (temperature 1), with the paired
standard error of their per-example val difference; then says which model a rule "keep
fine-tuning only if its val accuracy beats the probe's by more than z paired standard
errors" registers for several z, and what that does on test. Test is read only to report.

    .venv/bin/python bench/probe_rule.py /tmp/qn/debian-10-k40 /tmp/qn/fortunes-k40
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from _workspace import folder_probs

from transferops.config import load_config
from transferops.data.prepared import load_prepared
from transferops.finetune.probe import paired_se

Z = (0.0, 0.5, 1.0, 2.0)


def score(project: Path) -> dict:
    """Val/test accuracy of the registered candidate and the exact probe, and val's z."""
    here = Path.cwd()
    os.chdir(project)
    try:
        cfg = load_config("params.yaml")
        splits = {s: load_prepared(Path(cfg.data.out), s) for s in ("val", "test")}
        fine = Path(cfg.finetune.out)
        candidate = json.loads((fine / "model.json").read_text())["candidate"]
        probs = {
            "ft": folder_probs(fine, splits),
            "probe": folder_probs(Path(cfg.baseline.out) / "probe-s0", splits),
        }
    finally:
        os.chdir(here)
    y = {s: d.labels.numpy() for s, d in splits.items()}
    right = {m: {s: p[s].argmax(1) == y[s] for s in splits} for m, p in probs.items()}
    d = right["ft"]["val"].astype(float) - right["probe"]["val"]
    se = paired_se(d)
    return {
        "case": project.name,
        "candidate": candidate,
        "val": {m: float(r["val"].mean()) for m, r in right.items()},
        "test": {m: float(r["test"].mean()) for m, r in right.items()},
        "z": float(d.mean() / se) if se > 0 else float("inf") * np.sign(d.mean()),
        "n_val": len(d),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("projects", nargs="+", type=Path)
    args = ap.parse_args()
    rows = [score(p.resolve()) for p in args.projects]
    head = " | ".join(f"z = {z}: registers, test" for z in Z)
    print(f"| case | candidate | val ft / probe (n) | z | test ft / probe | {head} |")
    print("| --- " * (5 + len(Z)) + "|")
    for r in rows:
        cells = []
        for z in Z:
            ft = r["candidate"] == "classical" or r["z"] > z
            cells.append(f"{'ft' if ft else 'probe'}, {r['test']['ft' if ft else 'probe']:.3f}")
        print(
            f"| {r['case']} | {r['candidate']} | {r['val']['ft']:.3f} / {r['val']['probe']:.3f}"
            f" ({r['n_val']}) | {r['z']:+.2f} | {r['test']['ft']:.3f} / {r['test']['probe']:.3f}"
            f" | " + " | ".join(cells) + " |"
        )


if __name__ == "__main__":
    main()
