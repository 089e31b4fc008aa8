"""Weight-space ensembles of the fine-tuned model and the model it started from (WiSE-FT).

Fine-tuning starts from the exact probe (LP-FT): the pretrained backbone with the probe's
head. WiSE-FT (Wortsman et al., CVPR 2022) interpolates every weight between that start
theta_0 and the fine-tuned theta_1: theta(alpha) = (1 - alpha) theta_0 + alpha theta_1. The
paper found alpha ~0.5 beat both ends in and out of distribution on CLIP models; whether it
pays for small supervised sources here is what this script measures. Per case (prepared as
``bench/quality.py`` would, in ``--out/<case>``): the exact probe once, then fixed
configurations x seeds, each scored at every alpha on val and test, single runs and the
two-seed ensemble (seeds 0+1, 1+2, 0+2: what ``finetune.ensemble: 2`` registers). Test is
read only to report; a rule that picks alpha on val is scored as it would run.

    .venv/bin/python bench/wise.py --cases debian-10-k40,clipart-10-k20 --out /tmp/wise
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from fixed import CONFIGS, PROBE, prepared_case

from transferops.config import with_overrides
from transferops.finetune.train import save_finetuned, train_model
from transferops.model.folder import load_finetuned
from transferops.model.inputs import folder_inputs
from transferops.model.predict import predict_probs

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate(theta0: dict, theta1: dict, alpha: float) -> dict:
    """(1 - alpha) theta0 + alpha theta1 for float tensors; the rest (counters) from theta1."""
    return {
        k: torch.lerp(theta0[k], v, alpha) if v.is_floating_point() else v
        for k, v in theta1.items()
    }


def alpha_probs(folder: Path, theta0: dict, splits: dict) -> dict[float, dict[str, np.ndarray]]:
    """{alpha: {split: probabilities}} of the fine-tuned model folder interpolated toward the
    probe's weights `theta0`, at temperature 1."""
    net, spec = load_finetuned(folder)
    theta1 = {k: v.clone() for k, v in net.state_dict().items()}
    out = {}
    for a in ALPHAS:
        net.load_state_dict(interpolate(theta0, theta1, a))
        out[a] = {
            s: predict_probs(
                net,
                spec | {"temperature": 1.0},
                folder_inputs(d, folder, spec),
                torch.device("cpu"),
            )
            for s, d in splits.items()
        }
    return out


def scores(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean log-loss)."""
    return float((p.argmax(1) == y).mean()), float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())


def run(case: str, out: Path, seeds: list[int]) -> list[dict]:
    """One row per (config, seeds, alpha): val and test accuracy and log-loss."""
    rows = []
    with prepared_case(case, out) as (folder, cfg, splits, y):
        res, spec = train_model(with_overrides(cfg, PROBE))
        save_finetuned(res, spec, folder / "runs" / "probe", Path(cfg.source.out))
        theta0 = {
            k: v.clone()
            for k, v in load_finetuned(folder / "runs" / "probe")[0].state_dict().items()
        }
        for lr, depth in CONFIGS:
            probs = {}
            for seed in seeds:
                run_cfg = with_overrides(
                    cfg,
                    {"finetune.lr": lr, "finetune.unfreeze_depth": depth, "finetune.seed": seed},
                )
                w, c = time.perf_counter(), time.process_time()
                res, spec = train_model(run_cfg)
                secs = (time.perf_counter() - w, time.process_time() - c)
                dest = folder / "runs" / f"{lr}-{depth}-{seed}"
                save_finetuned(res, spec, dest, Path(cfg.source.out))
                probs[seed] = alpha_probs(dest, theta0, splits)
                print(
                    json.dumps(
                        {
                            "case": case,
                            "lr": lr,
                            "depth": depth,
                            "seed": seed,
                            "at_probe": spec["candidate"] == "probe",
                            "seconds": secs,
                        }
                    ),
                    flush=True,
                )
            members = [(s,) for s in seeds] + list(itertools.combinations(seeds, 2))
            for m in members:
                for a in ALPHAS:
                    row = {"case": case, "lr": lr, "depth": depth, "seeds": m, "alpha": a}
                    for s in ("val", "test"):
                        p = np.mean([probs[i][a][s] for i in m], axis=0)
                        row[s], row[f"{s}_nll"] = scores(p, y[s])
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def pick_on_val(rows: list[dict], grid: tuple[float, ...]) -> list[dict]:
    """Per (case, config, seeds): the row whose alpha in `grid` has the lowest val log-loss."""
    out = []
    keys = {(r["case"], r["lr"], r["depth"], tuple(r["seeds"])) for r in rows}
    for k in sorted(keys):
        rs = [
            r
            for r in rows
            if (r["case"], r["lr"], r["depth"], tuple(r["seeds"])) == k and r["alpha"] in grid
        ]
        out.append(min(rs, key=lambda r: (r["val_nll"], -r["alpha"])))
    return out


def _key(r: dict) -> tuple:
    return (r["case"], r["lr"], r["depth"], len(r["seeds"]))


def table(rows: list[dict]) -> str:
    """Mean test accuracy (min..max over seeds or seed pairs) per case, config, size, alpha;
    and the val-chosen alpha."""
    lines = [
        "| case | head lr / depth | members | "
        + " | ".join(f"alpha {a}" for a in ALPHAS)
        + " | alpha by val NLL (chosen alphas) |",
        "| --- | --- | --- | " + " | ".join("---" for _ in ALPHAS) + " | --- |",
    ]
    chosen = pick_on_val(rows, ALPHAS)
    for key in sorted({_key(r) for r in rows}):
        cells = []
        for a in ALPHAS:
            t = np.array([r["test"] for r in rows if _key(r) == key and r["alpha"] == a])
            cells.append(f"{t.mean():.3f} ({t.min():.3f}..{t.max():.3f})")
        c = [r for r in chosen if _key(r) == key]
        t = np.array([r["test"] for r in c])
        cells.append(f"{t.mean():.3f} ({', '.join(str(r['alpha']) for r in c)})")
        lines.append(f"| {key[0]} | {key[1]} / {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="debian-10-k40")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("/tmp/wise"))
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        rows += run(case, args.out.resolve(), [int(s) for s in args.seeds.split(",")])
        (args.out / "rows.json").write_text(json.dumps(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
