"""The transfer search's first trials: the sampler's seeded draws, or spread over the space?

TPE starts from 5 random draws of its seed. On the text case one draw's first three trials
all missed what beats the exact probe, so the search stopped "without headroom" where other
draws found 1-6 points over it. ``search.start: spread`` (the default) runs a design instead
(src/transferops/search/start.py): the same first trials on every seed, spread over lr x
depth. This script prepares each case (``bench/quality.py``'s cases, default params.yaml +
the case's overrides; prepare and the source ranking only), then runs the transfer search
both ways for each search seed, side by side in one process: the search's pick, its val
accuracy, its model's test accuracy (test is read only here, to report), how many
configurations were fully evaluated, whether it stopped without headroom, how many complete
configurations val cannot tell from the pick (the summary's ``within_noise``), and its wall and
CPU seconds. The registered model (the pick's seed ensemble) is not trained here.

    .venv/bin/python bench/search_start.py --cases digits-k20-auto,fortunes-k40 \
        --seeds 0,1,2 --out /tmp/ss
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from _workspace import folder_probs
from quality import CASES, in_case_folder

from transferops.config import Config, load_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.finetune.train import BEST_MODEL
from transferops.runtime.memory import tensor_sized_malloc
from transferops.search.sources import pull_best
from transferops.search.study import run_search


def ready(name: str, out: Path) -> Path:
    """The case's project folder with its data prepared and its source chosen and pulled
    (kept from an earlier run of this script when there is one)."""
    if (out / name / "overrides.json").exists():
        return out / name
    with in_case_folder(out, name, CASES[name]) as folder:
        cfg = load_config(Path("params.yaml"), CASES[name])
        prepare(cfg)
        pull_best(cfg)
        (folder / "overrides.json").write_text(json.dumps(CASES[name]))
    return folder


def test_accuracy(folder: Path, cfg: Config) -> float:
    """Test accuracy of the model folder (served as predict does, temperature 1)."""
    test = load_prepared(Path(cfg.data.out), "test")
    p = folder_probs(folder, {"test": test})["test"]
    return float((p.argmax(1) == test.labels.numpy()).mean())


def search_once(project: Path, start: str, seed: int, work: Path) -> dict:
    """One transfer search of `project` started `start`, drawn with `seed`, into `work`."""
    overrides = json.loads((project / "overrides.json").read_text())
    here = Path.cwd()
    os.chdir(project)  # the case's params.yaml holds paths relative to it
    try:
        cfg = with_overrides(
            load_config(Path("params.yaml"), overrides),
            {
                "search.start": start,
                "search.seed": seed,
                "search.storage": f"sqlite:///{work}/optuna.db",
                "search.out": str(work / "search"),
                "tracking.uri": f"sqlite:///{work}/mlflow.db",
                "tracking.artifact_location": str(work / "mlartifacts"),
                "finetune.checkpoint_dir": str(work / "ck"),
            },
        )
        w, c = time.perf_counter(), time.process_time()
        found = run_search(cfg)
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        summary = json.loads((work / "search" / "summary.json").read_text())
        noise = summary["within_noise"]  # what the search itself found
        test = test_accuracy(work / "search" / BEST_MODEL, cfg)
    finally:
        os.chdir(here)
    p = found.best_params
    return {
        "pick": f"lr {p.get('finetune.lr', 0):.2g}, depth {p.get('finetune.unfreeze_depth')}",
        "val": found.best_value,
        "test": test,
        "evaluated": f"{found.counts.get('complete', 0)} of "
        f"{found.counts.get('complete', 0) + found.counts.get('pruned', 0)}",
        "stopped": "yes" if summary.get("stopped_early") else "no",
        "tied": f"{len(noise['trials'])} (±{100 * noise['margin']:.1f})",
        "seconds": f"{wall:.0f} / {cpu:.0f}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="digits-k20-auto,folder-9x1300,clipart-10-k20")
    ap.add_argument("--seeds", default="0,1,2", help="search.seed values (draws)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/search-start"))
    args = ap.parse_args()
    tensor_sized_malloc()
    print(f"# {os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        "| case | start | search seed | pick | val | test (the pick alone) | configs fully "
        "evaluated | stopped without headroom | within val noise of the pick (±points) | "
        "search wall / CPU s |"
    )
    print("| --- " * 10 + "|")
    for name in args.cases.split(","):
        project = ready(name, args.out.resolve())
        for seed in (int(s) for s in args.seeds.split(",")):
            for start in ("sampler", "spread"):
                work = project / "bench" / f"{start}-s{seed}"
                work.mkdir(parents=True, exist_ok=True)
                r = search_once(project, start, seed, work)
                print(
                    f"| {name} | {start} | {seed} | {r['pick']} | {r['val']:.3f} | "
                    f"{r['test']:.3f} | {r['evaluated']} | {r['stopped']} | {r['tied']} | "
                    f"{r['seconds']} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
