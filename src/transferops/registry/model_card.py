"""The model card (markdown) logged with each registered version: what the model is, how it
was trained and what the evidence says, in words a reader checks at a glance."""

from __future__ import annotations

import json
from typing import Any

from transferops.evaluation.report import recipe_below
from transferops.finetune.train import candidate_note
from transferops.model.inputs import input_side
from transferops.registry.client import CHAMPION


def model_card(name: str, version: str, tags: dict[str, str], spec: dict, metrics: dict) -> str:
    """The model card (markdown) logged with each version."""
    classes = json.loads(tags["classes"])
    models = metrics["models"]
    rows = [
        f"| **this model** | {float(tags['test_accuracy']):.3f} | "
        f"{float(tags['test_macro_f1']):.3f} |"
    ]
    for role in ("transfer", "scratch", "probe"):
        if role in models:  # the recipe's expectation and spread: one seed is one draw
            a = models[role]["accuracy"]
            spread = (
                f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]" if a.get("ci_low") is not None else ""
            )
            at_probe = models[role].get("at_probe")
            rows.append(
                f"| {role} (mean of {a['n']} seed(s), 95% t-interval"
                + (f"; {at_probe} ended at the exact probe" if at_probe else "")
                + f") | {a['mean']:.3f}{spread} | {models[role]['macro_f1']['mean']:.3f} |"
            )
    if "classical" in models:
        c = models["classical"]
        rows.append(f"| classical | {c['accuracy']:.3f} | {c['macro_f1']:.3f} |")
    lines = [
        f"# {name} v{version}",
        "",
        f"{spec['modality'].capitalize()} classifier over {len(classes)} classes: "
        + ", ".join(f"`{c}`" for c in classes[:30])
        + (" ..." if len(classes) > 30 else "")
        + ".",
        "",
        "## Lineage",
        "",
        f"- data hash: `{tags['data_hash']}` (test split: {tags['test_size']} examples)",
        f"- source model: {tags['source_origin']}"
        + (f" (sha256 `{tags['source_sha256'][:16]}`)" if "source_sha256" in tags else ""),
        f"- code: git `{tags['git_commit'][:12]}`"
        + (" with uncommitted changes" if tags["git_dirty"] == "true" else ""),
        f"- weights sha256: `{tags['model_sha256'][:16]}`",
    ]
    if "best_trial" in tags:
        tied = tags.get("search_within_noise")
        lines.append(
            f"- search: best trial {tags['best_trial']}, params {tags['best_params']}"
            + (f" ({tied} complete configurations within val noise of it)" if tied else "")
        )
    lines += [
        f"- fine-tuning params: `{tags['params']}`",
        "",
        "## Test results",
        "",
        f"**{metrics['verdict']}**",
        "",
        "| model | accuracy | macro-F1 |",
        "| --- | --- | --- |",
        *rows,
        "",
        "## Use",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{name}@{CHAMPION}")',
        (
            'model.predict(pd.DataFrame({"image": [open("x.png", "rb").read()]}))'
            if spec["modality"] == "image"
            else 'model.predict(pd.DataFrame({"text": ["some text"]}))'
        ),
        "```",
        "",
        _inputs(spec),
        "",
        "## Limits",
        "",
        "Scored on one held-out test split of the data above; expect lower accuracy on data "
        "that differs from it.",
    ]
    return "\n".join(lines + _caveats(tags, metrics)) + "\n"


def _inputs(spec: dict[str, Any]) -> str:
    """What the served model takes, and what it does to it before the network."""
    if spec["modality"] != "image":
        return f"Inputs are texts, truncated to {spec.get('max_length')} tokens."
    side = input_side(spec["source"], None)  # set only when the model upsamples
    return (
        f"Inputs are image bytes or paths, decoded and fitted to {spec.get('image_size')} px "
        f"({spec.get('image_resize', 'crop')}) like the training data"
        + (
            f", then upsampled to {side} px by the model itself (the input size the source "
            "ranking chose)."
            if side
            else "."
        )
    )


def _caveats(tags: dict[str, str], metrics: dict[str, Any]) -> list[str]:
    """The model card's warnings: what this model is, and what beats it."""
    lines = []
    note = candidate_note(tags["candidate"], metrics["finetuned"].get("members"))
    if note:
        lines.append(f"This is {note}.")
    left_out = (metrics.get("data") or {}).get("left_out_classes")
    if left_out:
        lines.append(
            f"Class(es) {', '.join(left_out)} were in the data but left out: too few "
            "examples to split into train/val/test (data.on_small_class: skip). This model "
            "does not know them: their examples get one of the classes above."
        )
    dropped = metrics["finetuned"].get("dropped_classes")
    if dropped:
        lines.append(
            f"Class {', '.join(dropped)}: this model never gets it right on the test split "
            "(recall 0), where the exact linear probe recognises some of its examples."
        )
    recipe = recipe_below(metrics).get("probe")
    if tags["candidate"] not in ("classical", "probe") and recipe:
        lines.append(
            f"Fine-tuning, the recipe behind this model, scores significantly lower than the "
            f"exact probe on the test split ({100 * recipe['mean']:+.1f} points "
            f"[{100 * recipe['ci_low']:+.1f}, {100 * recipe['ci_high']:+.1f}], mean of its "
            f"{recipe['over_seeds']['n']} seeds): val chose it, test does not bear that out."
        )
    better = [r for r, d in metrics["finetuned"].get("minus", {}).items() if d["ci_high"] < 0]
    if better:
        lines.append(
            f"The {' and '.join(better)} baseline(s) score significantly higher than this model "
            "on the test split: prefer them unless this model is needed for another reason."
        )
    return lines
