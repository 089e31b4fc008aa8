"""Search pruners side by side: what the search compares, and what it costs.

Each row is one search (params.yaml's: 8 trials of lr x unfreeze depth, TPE seeded, every
trial starting from the exact probe) on one case, in its own fresh project folder, one
after the other: wall and CPU seconds of the search, configurations fully evaluated /
pruned, the best val accuracy, and the test accuracy of the model the search keeps
(``models/search/best_model``, what `train` copies; test is read here only to report,
never to choose). ``--src NAME=PATH`` runs the rows with another transferops source tree
first on the path (e.g. the code before a change), so before and after are measured in one
run on the same machine.

    .venv/bin/python bench/pruners.py [--cases digits-k20-auto,folder-9x1300]
        [--pruners median,hyperband,none] [--src before=/tmp/old/src --src after=src]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")

ROOT = Path(__file__).resolve().parents[1]


def run(case: str, pruner: str, folder: Path) -> dict:
    """One search in `folder` (this process's transferops); its figures."""
    import torch

    import transferops
    from bench.quality import CASES, write_case_data
    from transferops.config import load_config, with_overrides
    from transferops.data.prepare import prepare
    from transferops.data.prepared import load_prepared
    from transferops.evaluation.evaluate import predict
    from transferops.runtime.artifacts import read_json
    from transferops.search.study import run_search
    from transferops.sources.pull import pull_from_config

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # the params.yaml of the code tree under test (an older tree may not know a newer key)
    shutil.copy(Path(transferops.__file__).parents[2] / "params.yaml", folder / "params.yaml")
    overrides = CASES[case] | {"search.pruner": pruner}
    write_case_data(folder, overrides)
    os.chdir(folder)  # every path in params.yaml is the project folder's
    cfg = with_overrides(load_config(Path("params.yaml")), overrides)
    prepare(cfg)
    pull_from_config(cfg)
    w, c = time.perf_counter(), time.process_time()
    res = run_search(cfg)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    test = load_prepared(cfg.data.out, "test")
    probs = predict(Path(cfg.search.out) / "best_model", test, torch.device("cpu"))
    acc = float((probs.argmax(1) == test.labels.numpy()).mean())
    counts = read_json(Path(cfg.search.out) / "summary.json")["counts"]
    return {"wall": wall, "cpu": cpu, "counts": counts, "val": res.best_value, "test": acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", default="digits-k20-auto")
    ap.add_argument("--pruners", default="median,hyperband,none")
    ap.add_argument("--src", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-pruners"))
    ap.add_argument("--one", nargs=3, metavar=("CASE", "PRUNER", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a row, in its own process (see --src)
        print(json.dumps(run(args.one[0], args.one[1], Path(args.one[2]))))
        return
    sources = dict(s.split("=", 1) for s in args.src) or {"this": str(ROOT / "src")}
    import torch

    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print("| case | code | pruner | wall s | CPU s | complete / pruned | best val | its test acc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in args.cases.split(","):
        for name, src in sources.items():
            for pruner in args.pruners.split(","):
                env = os.environ | {"PYTHONPATH": f"{Path(src).resolve()}:{ROOT}"}
                folder = args.out / f"{case}-{name}-{pruner}"
                p = subprocess.run(
                    [sys.executable, __file__, "--one", case, pruner, str(folder)],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if p.returncode != 0:
                    why = p.stderr[-300:]
                    print(f"| {case} | {name} | {pruner} | failed: {why!r} |", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                k = r["counts"]
                print(
                    f"| {case} | {name} | {pruner} | {r['wall']:.0f} | {r['cpu']:.0f} | "
                    f"{k['complete']} / {k['pruned']} | {r['val']:.4f} | {r['test']:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
