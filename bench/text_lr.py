"""The thawed blocks' learning rate on text encoders: ``finetune.block_lr_scale``.

Block j from the top trains at ``lr * block_lr_scale * layer_decay**j`` (AdamW). The search's
head lrs run 3e-4..3e-2, so at scale 1 MiniLM's top layer trains at 1.8e-3 for the middle lr
0.003: some 40x what BERT-style encoders are usually fine-tuned with (2e-5..5e-5). This script
prepares each case once (as ``bench/quality.py`` would, in ``--out/<case>``), fits nothing
but fixed configurations, and scores each on val and test over several seeds: every scale x
(head lr, depth) x seed, beside the exact probe (the model fine-tuning starts from and must
beat). Test is read only to report.

    .venv/bin/python bench/text_lr.py --cases debian-10-k40,fortunes-k40 --out /tmp/tl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _workspace import folder_probs
from quality import CASES, in_case_folder

from transferops.config import load_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.finetune.train import save_finetuned, train_model
from transferops.sources.pull import pull

CONFIGS = [(0.003, 4), (0.001, 7)]  # (head lr, unfreeze depth): the design's first, a deep one


def run(case: str, out: Path, scales: list[float], seeds: list[int]) -> list[dict]:
    """Rows (case, scale, lr, depth, seed, val, test, at_probe, seconds) for one case."""
    rows = []
    with in_case_folder(out, case, CASES[case]) as folder:
        cfg = load_config(Path("params.yaml"), CASES[case])
        prepare(cfg)
        pull(cfg.source)
        splits = {s: load_prepared(Path(cfg.data.out), s) for s in ("val", "test")}
        y = {s: d.labels.numpy() for s, d in splits.items()}
        # the exact probe: one head-only epoch that can never replace it
        probe = {"finetune.unfreeze_depth": 0, "finetune.epochs_per_stage": [1]}
        grid = [(0.0, 0.003, 0, probe | {"finetune.beat_probe_by": 1e6})]
        grid += [(sc, lr, d, {}) for sc in scales for lr, d in CONFIGS]
        for scale, lr, depth, extra in grid:
            for seed in seeds[: 1 if extra else None]:
                run_cfg = with_overrides(
                    cfg,
                    {
                        "finetune.block_lr_scale": scale or 1.0,
                        "finetune.lr": lr,
                        "finetune.unfreeze_depth": depth,
                        "finetune.seed": seed,
                        "finetune.checkpoint_dir": str(folder / "ck" / "x"),
                    }
                    | extra,
                )
                w, c = time.perf_counter(), time.process_time()
                res, spec = train_model(run_cfg)
                dest = folder / "runs" / f"{scale}-{lr}-{depth}-{seed}"
                save_finetuned(res, spec, dest, Path(cfg.source.out))
                p = folder_probs(dest, splits)
                row = {
                    "case": case,
                    "scale": scale,
                    "lr": lr,
                    "depth": depth,
                    "seed": seed,
                    "val": float((p["val"].argmax(1) == y["val"]).mean()),
                    "test": float((p["test"].argmax(1) == y["test"]).mean()),
                    "at_probe": spec["candidate"] == "probe",
                    "probe_val": res.probe.val_accuracy if res.probe else None,
                    "seconds": (time.perf_counter() - w, time.process_time() - c),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Mean and spread over seeds per (case, scale, lr, depth)."""
    keys = sorted({(r["case"], r["scale"], r["lr"], r["depth"]) for r in rows})
    lines = [
        "| case | block_lr_scale | head lr / depth | val mean | test mean (min..max) | "
        "at probe | s / run (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k in keys:
        rs = [r for r in rows if (r["case"], r["scale"], r["lr"], r["depth"]) == k]
        t = np.array([r["test"] for r in rs])
        lines.append(
            f"| {k[0]} | {k[1]} | {k[2]} / {k[3]} | {np.mean([r['val'] for r in rs]):.3f} | "
            f"{t.mean():.3f} ({t.min():.3f}..{t.max():.3f}) | "
            f"{sum(r['at_probe'] for r in rs)}/{len(rs)} | "
            f"{np.mean([r['seconds'][0] for r in rs]):.0f} "
            f"({np.mean([r['seconds'][1] for r in rs]):.0f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="debian-10-k40")
    ap.add_argument("--scales", default="1,0.1,0.03")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("/tmp/text_lr"))
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        rows += run(
            case,
            args.out.resolve(),
            [float(s) for s in args.scales.split(",")],
            [int(s) for s in args.seeds.split(",")],
        )
    print(table(rows))


if __name__ == "__main__":
    main()
