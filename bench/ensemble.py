"""Ensembles of fine-tuning seeds: does averaging what several seeds predict pay?

Reads finished quality-benchmark folders (``bench/quality.py --set 'baseline.seeds=[0,1,2]'``
leaves every seed's transfer run in ``<case>/models/baseline/transfer-s<seed>``) and scores,
on val and on test, every subset of those seeds: one seed alone, each pair, all of them, as
the average of their predicted probabilities (what ``finetune.ensemble`` registers), plus the
uniform average of their *weights* (a "soup", Wortsman et al. 2022) beside it. Test accuracy
is read only to report. No training: the runs are the benchmark's own.

    .venv/bin/python bench/ensemble.py /tmp/q/clipart-10-k20 /tmp/q/folder-9x1300 ...

Per case, a row per ensemble size: the mean test accuracy over the subsets of that size with
its min..max (the spread a user sees across seed draws), the mean val accuracy, the mean test
NLL (temperature 1 for all: the comparison is of the models, not of calibration), and the
CPU seconds to score.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from transferops.data.prepared import load_prepared
from transferops.model.blocks import StagedNet
from transferops.model.folder import load_finetuned
from transferops.model.inputs import folder_inputs
from transferops.model.predict import predict_probs

CPU = torch.device("cpu")


def _probs(net: StagedNet, spec: dict, folder: Path, splits: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, data in splits.items():
        inputs = folder_inputs(data, folder, spec)
        out[name] = predict_probs(net.eval(), spec | {"temperature": 1.0}, inputs, CPU)
    return out


def _soup(nets: list[StagedNet]) -> StagedNet:
    """The uniform average of the members' weights (BatchNorm statistics included)."""
    states = [n.state_dict() for n in nets]
    avg = {
        k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
        if v.is_floating_point()
        else v
        for k, v in states[0].items()
    }
    soup = nets[0]
    soup.load_state_dict(avg)
    return soup


def score_case(project: Path) -> list[dict]:
    """A row per ensemble size (and the soup of all seeds) for one finished case."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    data_out = project / params["data"]["out"]
    runs = sorted((project / params["baseline"]["out"]).glob("transfer-s*"))
    splits = {s: load_prepared(data_out, s) for s in ("val", "test")}
    y = {s: d.labels.numpy() for s, d in splits.items()}
    c0 = time.process_time()
    probs, nets = {}, []
    for run in runs:
        net, spec = load_finetuned(run)
        probs[run.name] = _probs(net, spec, run, splits)
        nets.append((net, spec, run))
    seconds = time.process_time() - c0

    def score(p: dict[str, np.ndarray]) -> dict[str, float]:
        return {
            "val": float((p["val"].argmax(1) == y["val"]).mean()),
            "test": float((p["test"].argmax(1) == y["test"]).mean()),
            "nll": float(-np.log(p["test"][np.arange(len(y["test"])), y["test"]] + 1e-12).mean()),
        }

    rows = []
    for k in range(1, len(runs) + 1):
        subsets = list(itertools.combinations(probs, k))
        got = [
            score({s: np.mean([probs[r][s] for r in sub], 0) for s in splits}) for sub in subsets
        ]
        tests = [g["test"] for g in got]
        rows.append(
            {
                "case": project.name,
                "model": "one seed" if k == 1 else f"ensemble of {k}",
                "subsets": len(subsets),
                "test": float(np.mean(tests)),
                "test_min": min(tests),
                "test_max": max(tests),
                "val": float(np.mean([g["val"] for g in got])),
                "nll": float(np.mean([g["nll"] for g in got])),
                "cpu_s": seconds * k / len(runs),  # scoring cost grows with the members
            }
        )
    if len(nets) > 1:
        _, spec, folder = nets[0]
        soup = score(_probs(_soup([n for n, _, _ in nets]), spec, folder, splits))
        rows.append(
            {"case": project.name, "model": f"soup of {len(nets)} (weights)", "subsets": 1}
            | {"test": soup["test"], "test_min": soup["test"], "test_max": soup["test"]}
            | {"val": soup["val"], "nll": soup["nll"], "cpu_s": seconds / len(runs)}
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="+", type=Path, help="finished quality-benchmark cases")
    args = ap.parse_args()
    print(
        "| case | model | subsets | test acc, mean (min..max) | val acc, mean | test NLL | "
        "scoring CPU s |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    for project in args.projects:
        for r in score_case(project):
            print(
                f"| {r['case']} | {r['model']} | {r['subsets']} | {r['test']:.3f} "
                f"({r['test_min']:.3f}..{r['test_max']:.3f}) | {r['val']:.3f} | "
                f"{r['nll']:.3f} | {r['cpu_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
