"""Class-balanced loss: does weighting classes by 1/count pay, and from what imbalance on?

The exact probe (Lite0 features, C on val log-loss; the head fine-tuning starts from) fitted
with plain and with balanced class weights (:mod:`transferops.finetune.balance`), on:
- a long-tailed training set cut from a balanced one: class k keeps n_max * r^(-k/(K-1))
  training examples (r = the imbalance ratio: 1, 2, 4, 8, 16), val and test untouched,
  several subsampling seeds;
- clip-art with all images (its own imbalance, bench/quality.py's clipart-10-all).
Printed: test accuracy, macro-F1, balanced accuracy (mean recall), lowest class recall,
means over the seeds with their spread (min..max).

    .venv/bin/python bench/balance.py [--cases folder-9x1300,clipart-10-all] [--seeds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import CASES, in_case_folder

from transferops.config import load_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared, read_manifest
from transferops.finetune.balance import class_weights, imbalance
from transferops.finetune.cache import encode_prefix
from transferops.finetune.probe import fit_probe
from transferops.model.families import build_staged
from transferops.model.inputs import make_inputs, make_preprocess
from transferops.sources.pull import load_source, pull


def features(cfg) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Lite0 pooled features and labels of the prepared train / val / test splits."""
    pull(cfg.source)
    size = read_manifest(cfg.data.out).get("image_size")
    src = load_source(cfg.source.out, size)
    splits = {s: load_prepared(cfg.data.out, s) for s in ("train", "val", "test")}
    k = len(splits["train"].class_names)
    net = build_staged(src.model, src.family, k, image_size=size or 32)
    pre = make_preprocess(src.manifest, torch.device("cpu"), splits["train"].modality)
    pre.place(net, torch.device("cpu"))
    out = {}
    with torch.no_grad():
        for split, data in splits.items():
            x = make_inputs(data, cfg.source.out, src.manifest, cfg.finetune.max_length)
            h = encode_prefix(net, x, net.num_blocks, pre, 128).double().numpy()
            out[split] = (h, data.labels.numpy())
    return out


def scores(fit, x: np.ndarray, y: np.ndarray, k: int) -> dict[str, float]:
    pred = (x @ fit.weight.double().numpy().T + fit.bias.double().numpy()).argmax(1)
    recall = np.array([(pred[y == c] == c).mean() for c in range(k) if (y == c).any()])
    f1 = []
    for c in range(k):
        tp = ((pred == c) & (y == c)).sum()
        p, r = tp / max(1, (pred == c).sum()), tp / max(1, (y == c).sum())
        f1.append(0.0 if tp == 0 else 2 * p * r / (p + r))
    return {
        "acc": float((pred == y).mean()),
        "f1": float(np.mean(f1)),
        "bal": float(recall.mean()),
        "min": float(recall.min()),
    }


def long_tail(y: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Indices keeping n_max * ratio^(-rank/(K-1)) examples of each class (random order of
    classes and examples, by `seed`)."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(y))
    n_max = min((y == c).sum() for c in classes)
    keep = []
    for rank, c in enumerate(classes):
        n = max(2, round(n_max * ratio ** (-rank / (len(classes) - 1))))
        keep.extend(rng.permutation(np.flatnonzero(y == c))[:n])
    return np.sort(np.array(keep))


def row(name: str, ratio: str, runs: list[dict[str, dict[str, float]]]) -> str:
    cells = []
    for key in ("acc", "f1", "bal", "min"):
        for mode in ("none", "balanced"):
            v = np.array([r[mode][key] for r in runs])
            cells.append(
                f"{v.mean():.3f}" + (f" ({v.min():.3f}..{v.max():.3f})" if len(v) > 1 else "")
            )
    return f"| {name} | {ratio} | {len(runs)} | " + " | ".join(cells) + " |"


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    ap.add_argument("--cases", default="folder-9x1300-all,clipart-10-all")
    ap.add_argument("--ratios", default="1,2,4,8,16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-balance"))
    args = ap.parse_args()
    head = " | ".join(
        f"{m} {mode}"
        for m in ("acc", "macro-F1", "bal. acc", "min recall")
        for mode in ("plain", "bal.")
    )
    print(f"| case | train imbalance | seeds | {head} |")
    print("| --- " * 11 + "|")
    for case in args.cases.split(","):
        overrides = CASES[case]
        with in_case_folder(args.out, case, overrides):
            cfg = with_overrides(load_config(Path("params.yaml")), overrides)
            prepare(cfg)
            f = features(cfg)
            (xtr, ytr), (xva, yva), (xte, yte) = f["train"], f["val"], f["test"]
            k = int(max(ytr.max(), yva.max(), yte.max())) + 1
            natural = imbalance(torch.from_numpy(ytr), k)
            plans: list[tuple[str, float | None, list[int]]] = [
                (f"{natural:.1f}x (its own)", None, [0])
            ]
            if natural < 1.5:  # a balanced case: cut long tails from it
                plans = [
                    (f"{r}x (cut)", float(r), list(range(args.seeds)))
                    for r in args.ratios.split(",")
                ]
            for label, ratio, seeds in plans:
                runs = []
                for seed in seeds:
                    idx = np.arange(len(ytr)) if ratio is None else long_tail(ytr, ratio, seed)
                    x, y = xtr[idx], ytr[idx]
                    res = {}
                    for mode in ("none", "balanced"):
                        w = class_weights(torch.from_numpy(y), k, mode)
                        res[mode] = scores(fit_probe(x, y, xva, yva, k, w), xte, yte, k)
                    runs.append(res)
                print(row(case, label, runs), flush=True)


if __name__ == "__main__":
    main()
