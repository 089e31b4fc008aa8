"""Source x input-size ranking: does the exact probe's val log-loss pick what scores on test?

For each case (bench/quality.py's cases and data writers) and each image size, the data is
prepared once; for each candidate source the pooled features of train, val and test are
computed once and the exact probe fitted (C on val loss), as ``transferops pull`` does with
``source.candidates`` (:mod:`transferops.search.sources`). Printed per row: val loss, val
accuracy, test accuracy of that probe, feature CPU / wall seconds (train + val), and which
candidate the pipeline's rule (:func:`choose`: cheapest within 1 SE of the lowest val loss)
picks at each size and over all sizes. Test is read here only to judge the ranking.

    .venv/bin/python bench/sources.py [--cases clipart-10-k20,folder-9x1300] [--sizes 64,128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import CASES, in_case_folder

from transferops.config import load_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared, read_manifest
from transferops.finetune.cache import encode_prefix
from transferops.finetune.probe import fit_probe, log_losses
from transferops.model.families import build_staged
from transferops.model.inputs import make_inputs, make_preprocess
from transferops.search.sources import Ranked, choose
from transferops.sources.pull import load_source, pull

IMAGE = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]


def score(cfg, name: str, splits: dict, work: Path) -> tuple[Ranked, float]:
    """(the candidate's ranking record, its probe's test accuracy)."""
    sub = cfg.source.model_copy(update={"name": name, "out": work / name, "candidates": None})
    pull(sub)
    size = read_manifest(cfg.data.out).get("image_size") or None
    src = load_source(sub.out, size)
    torch.manual_seed(0)
    net = build_staged(
        src.model, src.family, len(splits["train"].class_names), image_size=size or 32
    )
    pre = make_preprocess(src.manifest, torch.device("cpu"), splits["train"].modality)
    pre.place(net, torch.device("cpu"))
    feats, cpu, wall = {}, 0.0, 0.0
    with torch.no_grad():
        for s, data in splits.items():
            c0, w0 = time.process_time(), time.perf_counter()
            inputs = make_inputs(data, sub.out, src.manifest, cfg.finetune.max_length)
            feats[s] = encode_prefix(net, inputs, net.num_blocks, pre, 128).double().numpy()
            if s != "test":  # the pipeline computes train + val only
                cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
    y = {s: d.labels.numpy() for s, d in splits.items()}
    fit = fit_probe(
        feats["train"], y["train"], feats["val"], y["val"], len(splits["train"].class_names)
    )
    w, b = fit.weight.double().numpy(), fit.bias.double().numpy()
    test_acc = float(((feats["test"] @ w.T + b).argmax(1) == y["test"]).mean())
    losses = log_losses(feats["val"] @ w.T + b, y["val"])
    return Ranked(
        name, fit.val_loss, fit.val_accuracy, fit.C, w.shape[1], cpu, wall, losses
    ), test_acc


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cases", default="digits-k20-auto,folder-9x1300,clipart-10-k20,clipart-10-all"
    )
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-sources"))
    args = ap.parse_args()
    print(
        "| case | size | source | val loss | val acc | test acc (probe) | CPU s | wall s | picked |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        overrides = CASES[case]
        every: list[tuple[int, Ranked, float]] = []
        with in_case_folder(args.out, case, overrides):
            text = overrides.get("source.kind") == "hf"
            for size in [None] if text else [int(s) for s in args.sizes.split(",")]:
                extra = (
                    {} if text else {"data.image.size": size, "data.out": f"data/prepared-{size}"}
                )
                cfg = with_overrides(load_config(Path("params.yaml")), overrides | extra)
                prepare(cfg)
                splits = {s: load_prepared(cfg.data.out, s) for s in ("train", "val", "test")}
                names = [cfg.source.name] if text else IMAGE
                rows = [score(cfg, n, splits, Path("work")) for n in names]
                picked, _ = choose([r for r, _ in rows])
                for r, t in rows:
                    every.append((size, r, t))
                    mark = "yes" if r is picked else ""
                    print(
                        f"| {case} | {size or '-'} | {r.name} | {r.val_loss:.4f} "
                        f"| {r.val_accuracy:.3f} | {t:.3f} | {r.cpu_s:.1f} | {r.wall_s:.1f} "
                        f"| {mark} |",
                        flush=True,
                    )
            if len(every) > 1:
                best_test = max(every, key=lambda e: e[2])
                # over sizes: the same rule, the val losses are on the same val images
                overall, _ = choose([r for _, r, _ in every])
                o = next(e for e in every if e[1] is overall)
                print(
                    f"| {case} | all | rule picks {o[1].name} @ {o[0]} (test {o[2]:.3f}); "
                    f"best test {best_test[1].name} @ {best_test[0]} ({best_test[2]:.3f}) "
                    "| | | | | | |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
