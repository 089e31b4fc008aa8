"""One training setting compared on fixed configurations over seeds, beside the exact probe.

Each case is prepared once (as ``bench/quality.py`` would, in ``--out/<case>``) with the
source it names (no ranking: the comparison is of the setting, not of sources); then every
value of ``--param`` x two fixed configurations (head lr, unfreeze depth) x ``--seeds`` is
trained and scored on val and test. The exact probe (one head-only epoch that can never
replace it) is the line fine-tuning must beat. Test is read only to report. No search: a
search would pick another configuration per value, and its pick's luck would be measured
with the setting.

    .venv/bin/python bench/fixed.py --cases clipart-10-k20 \\
        --param finetune.augment --values none,crop,flip_crop --out /tmp/aug
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from _workspace import folder_probs
from quality import CASES, in_case_folder

from transferops.config import Config, load_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import PreparedData, load_prepared
from transferops.finetune.train import save_finetuned, train_model
from transferops.sources.pull import pull

CONFIGS = [(0.003, 4), (0.001, 7)]  # (head lr, unfreeze depth): the design's first, a deep one


# The exact probe: one head-only epoch that can never replace it
PROBE = {
    "finetune.unfreeze_depth": 0,
    "finetune.epochs_per_stage": [1],
    "finetune.beat_probe_by": 1e6,
}


@contextlib.contextmanager
def prepared_case(
    case: str, out: Path
) -> Iterator[tuple[Path, Config, dict[str, PreparedData], dict[str, np.ndarray]]]:
    """(project folder, config, val/test splits, their labels) of `case` prepared in
    ``out/<case>`` with its source pulled (no ranking); the working directory while inside."""
    with in_case_folder(out, case, CASES[case]) as folder:
        cfg = load_config(Path("params.yaml"), CASES[case] | {"source.candidates": None})
        prepare(cfg)
        pull(cfg.source)
        cfg = with_overrides(cfg, {"finetune.checkpoint_dir": str(folder / "ck" / "x")})
        splits = {s: load_prepared(Path(cfg.data.out), s) for s in ("val", "test")}
        yield folder, cfg, splits, {s: d.labels.numpy() for s, d in splits.items()}


def _value(text: str) -> object:
    """A --values item as YAML would read it (numbers, null, true/false, strings)."""
    import yaml

    return yaml.safe_load(text)


def run(
    case: str,
    out: Path,
    param: str,
    values: list[object],
    seeds: list[int],
    probe_per_value: bool = False,
) -> list[dict]:
    """Rows (case, value, lr, depth, seed, val, test, at_probe, seconds) for one case. With
    `probe_per_value`, the exact probe is fitted at each value too (a setting that changes
    the features it reads: finetune.max_length, finetune.precision), as "probe (<value>)"."""
    rows = []
    with prepared_case(case, out) as (folder, cfg, splits, y):
        if probe_per_value:
            grid = [(f"probe ({v})", 0.003, 0, PROBE | {param: v}) for v in values]
        else:
            grid = [("probe", 0.003, 0, PROBE)]
        grid += [(v, lr, d, {param: v}) for v in values for lr, d in CONFIGS]
        for value, lr, depth, extra in grid:
            for seed in seeds[: 1 if str(value).startswith("probe") else None]:
                run_cfg = with_overrides(
                    cfg,
                    {"finetune.lr": lr, "finetune.unfreeze_depth": depth, "finetune.seed": seed}
                    | extra,
                )
                w, c = time.perf_counter(), time.process_time()
                res, spec = train_model(run_cfg)
                secs = (time.perf_counter() - w, time.process_time() - c)
                dest = folder / "runs" / f"{value}-{lr}-{depth}-{seed}"
                save_finetuned(res, spec, dest, Path(cfg.source.out))
                p = folder_probs(dest, splits)
                row = {
                    "case": case,
                    "value": value,
                    "lr": lr,
                    "depth": depth,
                    "seed": seed,
                    "val": float((p["val"].argmax(1) == y["val"]).mean()),
                    "test": float((p["test"].argmax(1) == y["test"]).mean()),
                    "at_probe": spec["candidate"] == "probe",
                    "epochs": res.epochs_run,
                    "seconds": secs,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def table(rows: list[dict], param: str) -> str:
    """Per case and value: the exact probe, then mean test over configs x seeds, each
    config's mean and seed spread (max - min), val mean, runs at the probe, seconds."""
    lines = [
        f"| case | {param} | val mean | test mean (min..max) | minus probe (points) | "
        "per config: test mean, seed spread | at probe | wall / CPU s per run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        probes = {r["value"]: r["test"] for r in rs if str(r["value"]).startswith("probe")}
        for value in dict.fromkeys(r["value"] for r in rs):
            vs = [r for r in rs if r["value"] == value]
            probe = probes.get(f"probe ({value})", probes.get("probe", probes.get(value)))
            t = np.array([r["test"] for r in vs])
            per = []
            for lr, d in dict.fromkeys((r["lr"], r["depth"]) for r in vs):
                ct = np.array([r["test"] for r in vs if (r["lr"], r["depth"]) == (lr, d)])
                per.append(f"{lr}/{d}: {ct.mean():.3f}, {100 * (ct.max() - ct.min()):.1f}")
            lines.append(
                f"| {case} | {value} | {np.mean([r['val'] for r in vs]):.3f} | "
                f"{t.mean():.3f} ({t.min():.3f}..{t.max():.3f}) | "
                f"{100 * (t.mean() - probe):+.1f} | {'; '.join(per)} | "
                f"{sum(r['at_probe'] for r in vs)}/{len(vs)} | "
                f"{np.mean([r['seconds'][0] for r in vs]):.0f} / "
                f"{np.mean([r['seconds'][1] for r in vs]):.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="clipart-10-k20")
    ap.add_argument("--param", default="finetune.augment")
    ap.add_argument("--values", default="none,crop,flip_crop")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fixed"))
    ap.add_argument(
        "--probe-per-value",
        action="store_true",
        help="fit the exact probe at each value (a setting that changes its features)",
    )
    args = ap.parse_args()
    values = [_value(v) for v in args.values.split(",")]
    rows = []
    for case in args.cases.split(","):
        rows += run(
            case,
            args.out.resolve(),
            args.param,
            values,
            [int(s) for s in args.seeds.split(",")],
            args.probe_per_value,
        )
        (args.out / "rows.json").write_text(json.dumps(rows))
    print(table(rows, args.param))


if __name__ == "__main__":
    main()
