"""The evaluation report a person reads: ``evaluation.md``, its plots and the CSVs that
``dvc plots`` draws. Numbers come from :mod:`transferops.evaluation.evaluate`; nothing here
scores."""

from __future__ import annotations

import base64
import csv
import itertools
import re
from pathlib import Path
from typing import Any

import numpy as np

from transferops.finetune.train import candidate_note
from transferops.runtime.artifacts import read_json


def _acc_ci(row: dict[str, Any], role: str) -> str:
    ci = row.get(f"{role}_ci")
    return f"{row[role]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def efficiency_axes(ax: Any, efficiency: list[dict], models: dict[str, Any]) -> None:
    """Test accuracy vs labelled examples per class: transfer and scratch (first seed) at
    each size, shaded with the bootstrap interval over test examples; at "all", their mean
    over seeds with its interval; the probe and the classical baseline (all data) as
    reference lines."""
    xs = list(range(len(efficiency)))
    for role, colour in (("transfer", "tab:blue"), ("scratch", "tab:orange")):
        ax.plot(xs, [r[role] for r in efficiency], marker="o", color=colour, label=role)
        if all(f"{role}_ci" in r for r in efficiency):
            lo, hi = zip(*(r[f"{role}_ci"] for r in efficiency), strict=True)
            ax.fill_between(
                xs, lo, hi, color=colour, alpha=0.15, label=f"{role}: 95% CI over test examples"
            )
        acc = models.get(role, {}).get("accuracy")
        has_ci = isinstance(acc, dict) and acc.get("ci_low") is not None
        if has_ci and efficiency[-1]["per_class"] == "all":  # one seed: no interval to draw
            err = [[acc["mean"] - acc["ci_low"]], [acc["ci_high"] - acc["mean"]]]
            ax.errorbar(
                [xs[-1] + 0.08],
                [acc["mean"]],
                yerr=err,
                fmt="s",
                color=colour,
                capsize=4,
                label=f"{role}: mean of {acc['n']} seeds, 95% CI",
            )
    for role, style in (("probe", "--"), ("classical", ":")):
        acc = models.get(role, {}).get("accuracy")
        if acc is not None:
            mean = acc["mean"] if isinstance(acc, dict) else acc
            ax.axhline(mean, color="tab:gray", linestyle=style, label=f"{role} (all data)")
    ax.set_xticks(xs, [str(r["per_class"]) for r in efficiency])
    ax.set(
        xlabel="labelled training examples per class",
        ylabel="test accuracy",
        title="Data efficiency: transfer vs scratch",
    )
    ax.legend(fontsize=7, loc="lower right")


def write_plots(
    out: Path, first: dict, efficiency: list[dict], classes: list[str], models: dict[str, Any]
) -> None:
    """efficiency.csv, learning_curves.csv and the PNGs under plots/ (the DVC plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir()
    with open(out / "efficiency.csv", "w", newline="") as f:
        w = csv.writer(f)
        roles = ("transfer", "scratch")
        w.writerow(["per_class", *roles, *(f"{r}_{e}" for r in roles for e in ("low", "high"))])
        for r in efficiency:
            bounds = [b for role in roles for b in r.get(f"{role}_ci", [None, None])]
            w.writerow([r["per_class"], *(r[role] for role in roles), *bounds])
    curves = []
    for role, r in first.items():
        for h in read_json(Path(r["dir"]) / "history.json"):
            curves.append([role, h["epoch"], h["val_accuracy"], h["train_loss"], h.get("stage", 0)])
    with open(out / "learning_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["role", "epoch", "val_accuracy", "train_loss", "stage"])
        w.writerows(curves)

    if efficiency:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        efficiency_axes(ax, efficiency, models)
        fig.savefig(plots / "data_efficiency.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for role in first:
        pts = [(c[1], c[2]) for c in curves if c[0] == role]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=role)
    # Where transfer thaws more blocks: a dip just after one is the new stage's warm-up
    thaws = [
        c[1]
        for a, c in itertools.pairwise([c for c in curves if c[0] == "transfer"])
        if c[4] != a[4]
    ]
    for k, x in enumerate(thaws):
        ax.axvline(x - 0.5, color="gray", linestyle=":", label="blocks thawed" if k == 0 else None)
    ax.set(xlabel="epoch", ylabel="val accuracy", title="Learning curves (first seed)")
    ax.legend()
    fig.savefig(plots / "learning_curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    for role in ("transfer", "scratch"):
        if role not in first:
            continue
        cm = np.asarray(first[role]["metrics"]["confusion"])
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.imshow(cm, cmap="Blues")
        dark = cm.max() / 2  # counts on dark cells in white, or they cannot be read
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90)
        ax.set_yticks(ticks, classes)
        for i in ticks:
            for j in ticks:
                color = "white" if cm[i, j] > dark else "black"
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7, color=color)
        n = models[role]["accuracy"]["n"]  # the report's table averages n seeds; this is one
        which = f"{role}, seed {first[role]['seed']}" + (f" (1 of {n})" if n > 1 else "")
        ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix: {which}, test")
        fig.savefig(plots / f"confusion_{role}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def _fmt(m: dict[str, Any]) -> str:
    if m.get("ci_low") is None:
        return f"{m['mean']:.3f}"
    return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def data_line(metrics: dict) -> str:
    """Which data the report is about: path, counts, image size, few-shot limit, hash."""
    d = metrics.get("data") or {}
    counts = d.get("counts") or {}
    parts = [f"Data `{d['path']}`" if d.get("path") else "Data"]
    if counts:
        parts.append(" / ".join(f"{counts.get(s, 0)} {s}" for s in ("train", "val", "test")))
    if d.get("image_size"):
        parts.append(f"images {d['image_size']} px")
    if d.get("limit_per_class"):
        parts.append(f"at most {d['limit_per_class']} labelled per class (few-shot)")
    line = ", ".join(parts) + f"; hash `{metrics['data_hash'][:12]}`."
    if d.get("left_out_classes"):
        left = ", ".join(f"'{c}' ({n})" for c, n in d["left_out_classes"].items())
        line += (
            f" **Left out, too few examples to split (data.on_small_class: skip): {left}; "
            "the model does not know these classes.**"
        )
    if d.get("duplicates_across_splits"):
        line += (
            f" {d['duplicates_across_splits']} test or val example(s) are exact copies of "
            "one in another split: test accuracy is optimistic for them."
        )
    if d.get("conflicting_labels"):
        line += (
            f" {d['conflicting_labels']} example(s) are exact copies of one labelled with "
            "another class."
        )
    return line


def efficiency_lines(efficiency: list[dict[str, Any]]) -> list[str]:
    """The data-efficiency table (one run per point) and its chart."""
    if not efficiency:
        return []
    lines = [
        "",
        "## Data efficiency (first seed)",
        "",
        "One run per point, so the interval is the test set's sampling noise (bootstrap over "
        "the test examples), not the seeds'.",
        "",
        "| examples per class | transfer [95% CI] | scratch [95% CI] |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {r['per_class']} | {_acc_ci(r, 'transfer')} | {_acc_ci(r, 'scratch')} |"
        for r in efficiency
    ]
    return [*lines, "", "![data efficiency](plots/data_efficiency.png)"]


def source_lines(ranking: dict[str, Any] | None) -> list[str]:
    """The source candidates (and input sizes) as ranked before training, the chosen one in
    bold."""
    if not ranking:
        return []
    rows = ranking["candidates"]
    prepared = min((r["size"] for r in rows if r.get("size")), default=None)
    side = ranking.get("input_size")
    at = (
        f" at {side} px (the model upsamples the prepared {prepared}-px images to it)"
        if side
        else ""
    )
    lines = [
        "",
        "## Source (chosen before training)",
        "",
        f"Chosen: **{ranking['chosen']}**{at}: {ranking['why']}. Criterion: "
        f"{ranking['criterion']} (val split; the exact probe on each candidate's frozen "
        "features). Only the chosen source is fine-tuned: how the ranking matches each "
        "candidate's test probe is measured in bench/sources.py, not here.",
        "",
        "| source | input px | probe val log-loss | probe val accuracy | GFLOPs per image "
        "| weights MB | feature CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        won = r["name"] == ranking["chosen"] and r.get("size") in (side or prepared, None)
        gflops = f"{r['gflops']:.3g}" if r.get("gflops") is not None else "-"
        name = f"**{r['name']}**" if won else r["name"]
        lines.append(
            f"| {name} | {r.get('size') or '-'} | {r['val_loss']:.4f} | {r['val_accuracy']:.3f} | "
            f"{gflops} | {r.get('weights_mb', float('nan')):.1f} | {r['cpu_s']:.1f} |"
        )
    return lines


def _tied(t: dict[str, Any]) -> str:
    """How many complete configurations val could not tell from the best."""
    noise = t.get("within_noise")
    if not noise:
        return ""
    k = len(noise["trials"])
    head = (
        f"; {k} of {noise['of']} complete configurations within val noise of the best "
        f"(±{100 * noise['margin']:.1f} points on {noise['val_size']} val examples)"
    )
    return head + (": which of them was picked is noise, not a finding" if k > 1 else "")


def tuning_lines(tuning: dict[str, Any]) -> list[str]:
    """How much tuning each arm got: a comparison of a tuned arm with an untuned one
    flatters the tuned one."""
    if not tuning:
        return []
    lines = ["", "How each arm was tuned (on val):", ""]
    for arm in ("transfer", "scratch"):
        t = tuning.get(arm, {})
        if "trials" in t:
            # "waiting": start trials a search that stopped early never ran
            done = ", ".join(
                f"{n} {'not run' if state == 'waiting' else state}"
                for state, n in t["trials"].items()
                if n
            )
            best = ", ".join(_param(k, v) for k, v in t["best_params"].items())
            lines.append(f"- {arm}: an Optuna search ({done}); best {best}{_tied(t)}")
        elif arm == "scratch":
            lines.append("- scratch: no search (baseline.lr; baseline.scratch_trials is 0)")
    rising = tuning.get("scratch", {}).get("still_improving")
    if rising and rising[0]:
        lines.append(
            f"- scratch was still improving at its last epoch in {rising[0]} of {rising[1]} "
            "seed(s): more epochs (baseline.epoch_multiplier) could narrow the gap"
        )
    lines.append(
        "- probe: the exact probe (logistic regression on the frozen features, C picked on "
        "val), then its head trained further on the same frozen features by SGD for the "
        "transfer arm's epoch budget, each epoch kept only where it beats the exact probe on "
        "val: seeds can differ by that SGD (the cheap gate compares with this probe)"
    )
    return lines


def _param(key: str, value: Any) -> str:
    name = key.removeprefix("finetune.")
    return f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"


def recipe_below(metrics: dict) -> dict[str, dict]:
    """The baselines fine-tuning (the recipe, over its seeds) is significantly below on
    test: each one's paired difference transfer − baseline, its interval under 0."""
    return {
        other: d
        for other in ("scratch", "probe")
        if (d := metrics.get(f"transfer_minus_{other}", {}).get("accuracy")) and d["ci_high"] < 0
    }


def worse_than(other: str) -> str:
    """What it means when fine-tuning (the recipe, over its seeds) is significantly below a
    baseline on test: val chose it, test does not bear it out."""
    cheaper = " (the cheaper model)" if other == "probe" else ""
    return (
        f"**fine-tuning is significantly worse than the {other}{cheaper} on this data**: val "
        "chose it, test does not bear that out"
    )


def difference_lines(metrics: dict, conf: int) -> list[str]:
    """The paired differences in test accuracy (transfer vs the baselines, the model to
    register vs each), and a class the model to register drops."""
    lines = ["", f"Differences in test accuracy ({conf}% intervals):", ""]
    below = recipe_below(metrics)
    for other in ("scratch", "probe"):
        if f"transfer_minus_{other}" in metrics:
            d = metrics[f"transfer_minus_{other}"]["accuracy"]
            each = ", ".join(f"{x:+.3f}" for x in d["over_seeds"].get("per_seed", []))
            lines.append(
                f"- transfer − {other}: {_fmt(d)} over test examples; "
                f"{_fmt(d['over_seeds'])} over seeds"
                + (f" (each seed: {each})" if each else "")
                + (f" — {worse_than(other)}" if other in below else "")
            )
    cal = metrics.get("finetuned", {}).get("calibration")
    if cal and cal["temperature"] != 1.0:
        lines.append(
            f"- calibration of the model to register: temperature {cal['temperature']:.3f} "
            f"(fitted on val); test NLL {cal['test_nll_before']:.4f} -> "
            f"{cal['test_nll_after']:.4f}, ECE {cal['test_ece_before']:.4f} -> "
            f"{cal['test_ece_after']:.4f}; its probabilities (pyfunc, ONNX, predict) are the "
            "calibrated ones"
        )
    dropped = metrics.get("finetuned", {}).get("dropped_classes")
    if dropped:
        lines.append(
            f"- **class {', '.join(dropped)}: the model to register never gets it right on "
            "test (recall 0), where the exact probe recognises some**: promotion refuses it "
            "(`registry.dropped_class_gate`)"
        )
    transfer = metrics["models"].get("transfer", {})
    if transfer.get("at_probe"):
        lines.append(
            f"- transfer: {transfer['at_probe']} of {transfer['accuracy']['n']} seed(s) ended at "
            "the exact probe (no epoch beat it on val by more than noise: "
            "`finetune.beat_probe_by`)"
        )
    for role, d in metrics.get("finetuned", {}).get("minus", {}).items():
        lines.append(
            f"- model to register − {role}: {_fmt(d)}"
            + (f" — the {role} baseline is significantly better" if d["ci_high"] < 0 else "")
        )
    return lines


def report_markdown(metrics: dict, per_class: dict, classical: str | None) -> str:
    """evaluation.md: the verdict first, then the table, the curves and per-class scores."""
    conf = int(metrics["confidence"] * 100)
    lines = [
        "# Evaluation report",
        "",
        f"**Verdict: {metrics['verdict']}** (test accuracy; {conf}% paired bootstrap over the "
        f"{metrics['test_size']} test examples, each model averaged over its "
        f"{metrics['models']['transfer']['accuracy']['n']} seed(s)).",
        "",
        f"Test split: {metrics['test_size']} examples, read only here. {data_line(metrics)}",
        "",
        f"| model | accuracy ({conf}% CI) | balanced accuracy | macro-F1 | ECE |",
        "| --- | --- | --- | --- | --- |",
    ]
    for role, m in metrics["models"].items():
        if role == "classical":
            lines.append(
                f"| classical ({classical}) | {m['accuracy']:.3f} | "
                f"{m['balanced_accuracy']:.3f} | "
                f"{m['macro_f1']:.3f} | {m['ece']:.3f} |"
            )
        else:
            lines.append(
                f"| {role} | {_fmt(m['accuracy'])} | {_fmt(m['balanced_accuracy'])} | "
                f"{_fmt(m['macro_f1'])} | {_fmt(m['ece'])} |"
            )
    if "finetuned" in metrics:
        f = metrics["finetuned"]
        lines.insert(
            lines.index("| --- | --- | --- | --- | --- |") + 1,
            f"| **model to register** (`{f['dir']}`"
            + (
                f": {note}"
                if (note := candidate_note(f.get("candidate", ""), f.get("members")))
                else ""
            )
            + f") | {f['accuracy']:.3f} | {f['balanced_accuracy']:.3f} | "
            f"{f['macro_f1']:.3f} | {f['ece']:.3f} |",
        )
    lines += difference_lines(metrics, conf)
    lines += source_lines(metrics.get("source_ranking"))
    lines += tuning_lines(metrics.get("tuning", {}))
    lines += efficiency_lines(metrics["efficiency"])
    lines += [
        "",
        "## Per class (transfer, first seed)",
        "",
        "| class | precision | recall |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} |"
        for c, v in per_class.get("transfer", {}).items()
    ]
    lines += [
        "",
        "![learning curves](plots/learning_curves.png)",
        "![confusion transfer, first seed](plots/confusion_transfer.png)",
        "![confusion scratch, first seed](plots/confusion_scratch.png)",
        "",
    ]
    return "\n".join(lines)


def report_html(markdown: str, folder: Path) -> str:
    """evaluation.md as one self-contained HTML page: the plots inlined (no network, no
    side files), so it opens anywhere, and in MLflow's artifact viewer."""
    from markdown_it import MarkdownIt  # Rich's own markdown parser: always installed

    body = MarkdownIt("commonmark").enable("table").render(markdown)

    def inline(m: re.Match) -> str:
        png = folder / m["src"]
        if not png.exists():
            return m[0]
        return f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"'

    body = re.sub(r'src="(?P<src>[^"]+\.png)"', inline, body)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>transferops evaluation</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;"
        "padding:0 1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:.2em .6em;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}</style></head><body>" + body + "</body></html>\n"
    )
