"""Ensembles of search trials beside the ensemble of seeds: which members pay?

``finetune.ensemble: 2`` registers the best search trial (seed 0) averaged with a second run
of the same configuration at seed 1. The search has already trained other configurations
(another lr, another depth): averaging the best *trials* costs no training at all, and
members that differ in their hyperparameters may disagree more usefully than seeds do
("hyperparameter ensembles", Wenzel et al. 2020). This script runs the transfer search of a
finished quality-benchmark folder again (same params, a study of its own in the output
folder), keeps every complete trial's model, trains the seed-1 run of the best
configuration, and scores on val and test: the best trial alone, the seed ensemble (what is
registered today), the top 2 and top 3 trials by val, and the top 2 trials + the seed-1 run.
Probabilities are averaged at temperature 1; test is read only to report.

    .venv/bin/python bench/trial_ensemble.py /tmp/q/digits-k20-auto /tmp/q/folder-9x1300 \
        --out /tmp/te
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from _workspace import folder_probs

import transferops.search.study as study_mod
from transferops.config import load_config, with_overrides
from transferops.data.prepared import load_prepared
from transferops.finetune.train import save_finetuned, train_model
from transferops.runtime.memory import tensor_sized_malloc
from transferops.search.study import run_search


def keep_every_trial(dest: Path):
    """Replaces the search's keep-if-top: every complete trial keeps its model."""

    def keep(cfg, trial, res, spec, value) -> None:
        save_finetuned(
            res, spec | {"trial": trial.number}, dest / str(trial.number), Path(cfg.source.out)
        )

    return keep


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels `y` under probabilities `p`."""
    return float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())


def train_and_search(
    project: Path, work: Path, search_seed: int | None = None
) -> tuple[dict[str, Path], list[str], dict]:
    """The search again (every complete trial kept) and the seed-1 run of its best config."""
    cfg = load_config(project / "params.yaml")
    cfg = with_overrides(
        cfg,
        {
            "search.storage": f"sqlite:///{work}/optuna.db",
            "search.out": str(work / "search"),
            "tracking.uri": f"sqlite:///{work}/mlflow.db",
            "tracking.artifact_location": str(work / "mlartifacts"),
            "compute.n_workers": 1,
        }
        | ({"search.seed": search_seed} if search_seed is not None else {}),
    )
    seconds = {}
    t, c = time.perf_counter(), time.process_time()
    with patch.object(study_mod, "_keep_if_top", keep_every_trial(work / "trials")):
        found = run_search(cfg)
    seconds["search"] = (time.perf_counter() - t, time.process_time() - c)
    t, c = time.perf_counter(), time.process_time()
    seed1 = with_overrides(
        cfg,
        found.best_params
        | {"finetune.seed": cfg.finetune.seed + 1, "finetune.checkpoint_dir": str(work / "ck")},
    )
    res, spec = train_model(seed1)
    save_finetuned(res, spec, work / "seed1", Path(cfg.source.out))
    seconds["seed 1"] = (time.perf_counter() - t, time.process_time() - c)
    trials = {
        f"trial {p.name}": p for p in (work / "trials").iterdir() if (p / "model.json").exists()
    }

    def val_key(name: str) -> tuple[float, float]:
        spec = json.loads((trials[name] / "model.json").read_text())
        return (spec["val_accuracy"], -spec["val_loss"])

    ranked = sorted(trials, key=val_key, reverse=True)
    return trials | {"seed 1": work / "seed1"}, ranked, {"found": found, "seconds": seconds}


def score_case(project: Path, out: Path, search_seed: int | None = None) -> list[dict]:
    """A row per ensemble for one case (the search drawn with `search_seed`, if given)."""
    project = project.resolve()
    work = (out / f"{project.name}{'' if search_seed is None else f'-s{search_seed}'}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(project)  # the case's params.yaml holds paths relative to it
    try:
        members, ranked, info = train_and_search(project, work, search_seed)
        cfg = load_config("params.yaml")
        splits = {s: load_prepared(Path(cfg.data.out), s) for s in ("val", "test")}
    finally:
        os.chdir(here)
    y = {s: d.labels.numpy() for s, d in splits.items()}
    probs = {name: folder_probs(folder, splits) for name, folder in members.items()}
    best = f"trial {info['found'].best_trial}"  # the search's pick: what train copies
    ranked = [best] + [n for n in ranked if n != best]
    choices = {
        "best trial alone": [best],
        "best trial + its seed-1 run (registered today)": [best, "seed 1"],
        "top 2 trials": ranked[:2],
        "top 3 trials": ranked[:3],
        "top 2 trials + seed-1 run": [*ranked[:2], "seed 1"],
    }
    rows = []
    for label, names in choices.items():
        p = {s: np.mean([probs[n][s] for n in names], 0) for s in splits}
        rows.append(
            {
                "case": project.name,
                "model": label,
                "members": ", ".join(names),
                "val": float((p["val"].argmax(1) == y["val"]).mean()),
                "test": float((p["test"].argmax(1) == y["test"]).mean()),
                "nll": nll(p["test"], y["test"]),
            }
        )
    found = info["found"]
    rows[0]["note"] = f"{len(ranked)} complete trials; best {found.best_params}; " + ", ".join(
        f"{k} {w:.0f}/{c:.0f} s" for k, (w, c) in info["seconds"].items()
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/trial-ensemble"))
    ap.add_argument("--search-seed", type=int, default=None, help="search.seed (a new draw)")
    args = ap.parse_args()
    tensor_sized_malloc()
    print(f"# {os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| case | model | members | val acc | test acc | test NLL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for project in args.projects:
        rows = score_case(project, args.out, args.search_seed)
        for r in rows:
            print(
                f"| {r['case']} | {r['model']} | {r['members']} | {r['val']:.3f} | "
                f"{r['test']:.3f} | {r['nll']:.3f} |",
                flush=True,
            )
        print(f"<!-- {rows[0]['case']}: {rows[0]['note']} -->", flush=True)


if __name__ == "__main__":
    main()
