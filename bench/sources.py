"""Source x input-size ranking: does the exact probe's val log-loss pick what scores on test?

For each case (bench/quality.py's cases and data writers) and each image size, the data is
prepared once; for each candidate source the pooled features of train, val and test are
computed once and the exact probe fitted (C on val loss), as ``transferops pull`` does with
``source.candidates`` (:mod:`transferops.search.sources`). Printed per row: val loss, val
accuracy, test accuracy of that probe, feature CPU / wall seconds (train + val), and which
candidate the pipeline's rule (:func:`choose`: cheapest within 1 SE of the lowest val loss)
picks at each size and over all sizes. Test is read here only to judge the ranking.

``--upsample`` measures what the pipeline does with ``source.sizes``: the data prepared once
(its own ``data.image.size``), each source pulled at every larger side (the model upsamples
its input), and the pick of the full source x size grid beside the pipeline's greedy one
(sources at the prepared side, then the winner's larger sides).

    .venv/bin/python bench/sources.py [--cases clipart-10-k20,folder-9x1300] [--sizes 64,128]
    .venv/bin/python bench/sources.py --upsample --cases digits-k20-auto --sizes 128
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
from transferops.finetune.features import frozen_features, image_gflops
from transferops.finetune.probe import fit_probe, log_losses
from transferops.model.inputs import input_side
from transferops.runtime.artifacts import read_json
from transferops.search.sources import Ranked, choose
from transferops.sources.pull import pull

IMAGE = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]


def score(
    cfg, name: str, splits: dict, work: Path, input_size: int | None = None
) -> tuple[Ranked, float]:
    """(the candidate's ranking record, its probe's test accuracy); `input_size`: pulled as
    the pipeline pulls a ranked size (the model upsamples the prepared images to it)."""
    sub = cfg.source.model_copy(
        update={"name": name, "out": work / f"{name}@{input_size}", "candidates": None}
    )
    pull(sub, ranking={"input_size": input_size} if input_size else None)
    size = read_manifest(cfg.data.out).get("image_size") or None
    side = input_side(read_json(sub.out / "manifest.json"), size)
    cpu = torch.device("cpu")

    def features(names: tuple[str, ...]) -> dict:
        got = frozen_features(
            sub.out, {s: splits[s] for s in names}, size, cfg.finetune.max_length, cpu, 128
        )
        return {s: f.double().numpy() for s, f in got.items()}

    c0, w0 = time.process_time(), time.perf_counter()
    feats = features(("train", "val"))  # what the pipeline computes (and times)
    cpu_s, wall = time.process_time() - c0, time.perf_counter() - w0
    feats |= features(("test",))  # read here only to judge the ranking
    y = {s: d.labels.numpy() for s, d in splits.items()}
    fit = fit_probe(
        feats["train"], y["train"], feats["val"], y["val"], len(splits["train"].class_names)
    )
    w, b = fit.weight.double().numpy(), fit.bias.double().numpy()
    test_acc = float(((feats["test"] @ w.T + b).argmax(1) == y["test"]).mean())
    losses = log_losses(feats["val"] @ w.T + b, y["val"])
    gflops = image_gflops(sub.out, size) if size else None
    r = Ranked(name, side, fit.val_loss, fit.val_accuracy, fit.C, w.shape[1], cpu_s, wall, losses)
    r.gflops = gflops
    return r, test_acc


def _print(case: str, size, r: Ranked, t: float, mark: str) -> None:
    print(
        f"| {case} | {size or '-'} | {r.name} | {r.val_loss:.4f} | {r.val_accuracy:.3f} "
        f"| {t:.3f} | {r.gflops or 0:.3f} | {r.cpu_s:.1f} | {r.wall_s:.1f} | {mark} |",
        flush=True,
    )


def _summary(case: str, every: list[tuple[int, Ranked, float]], greedy: Ranked | None) -> None:
    best_test = max(every, key=lambda e: e[2])
    # over sizes: the same rule, the val losses are on the same val images
    overall, _ = choose([r for _, r, _ in every])
    o = next(e for e in every if e[1] is overall)
    also = ""
    if greedy is not None:
        g = next(e for e in every if e[1] is greedy)
        also = f"; the pipeline's greedy order picks {g[1].name} @ {g[0]} (test {g[2]:.3f})"
    print(
        f"| {case} | all | grid rule picks {o[1].name} @ {o[0]} (test {o[2]:.3f}){also}; "
        f"best test {best_test[1].name} @ {best_test[0]} ({best_test[2]:.3f}) "
        "| | | | | | | |",
        flush=True,
    )


def upsampled(case: str, cfg, sizes: list[int]) -> None:
    """The pipeline's way: prepared once (data.image.size as configured), every source at
    every side >= the prepared one, upsampled by the model; the grid's pick beside the
    greedy one (sources at the prepared side, then the winner's sides)."""
    prepare(cfg)
    splits = {s: load_prepared(cfg.data.out, s) for s in ("train", "val", "test")}
    p = read_manifest(cfg.data.out)["image_size"]
    every = []
    for side in sorted({p, *[s for s in sizes if s > p]}):
        rows = [score(cfg, n, splits, Path("work"), side if side != p else None) for n in IMAGE]
        picked, _ = choose([r for r, _ in rows])
        for r, t in rows:
            every.append((side, r, t))
            _print(case, side, r, t, "yes" if r is picked else "")
    first = [r for s, r, _ in every if s == p]
    lead, _ = choose(first)
    greedy, _ = choose(first + [r for s, r, _ in every if s != p and r.name == lead.name])
    _summary(case, every, greedy)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cases", default="digits-k20-auto,folder-9x1300,clipart-10-k20,clipart-10-all"
    )
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument(
        "--upsample",
        action="store_true",
        help="the pipeline's way: prepare once, the model upsamples to each larger side",
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-sources"))
    args = ap.parse_args()
    print(
        "| case | size | source | val loss | val acc | test acc (probe) | GFLOPs | CPU s | wall s "
        "| picked |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        overrides = CASES[case]
        every: list[tuple[int, Ranked, float]] = []
        with in_case_folder(args.out, case, overrides):
            text = overrides.get("source.kind") == "hf"
            if args.upsample and not text:
                cfg = with_overrides(load_config(Path("params.yaml")), overrides)
                upsampled(case, cfg, [int(s) for s in args.sizes.split(",")])
                continue
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
                    _print(case, size, r, t, "yes" if r is picked else "")
            if len(every) > 1:
                _summary(case, every, None)


if __name__ == "__main__":
    main()
