"""An adapted model (`transferops adapt`) as a version of its own, alias ``adapted``.

It does not go through the champion gates: they compare test accuracy on the training
domain, where an adapted model is expected to give some up. Its evidence is the labelled
target sample (the adapt step already refused a model worse there), carried as tags with its
lineage: the version it was adapted from, the target data's hash and folder, the methods.
Serve it by its alias (``models:/<name>@adapted``) where the new domain is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transferops.config import Config, registered_model_name
from transferops.model.folder import SPEC_FILE, verify_weights
from transferops.registry.register import RegisterResult, find_version, log_version
from transferops.runtime.artifacts import read_json
from transferops.runtime.tracking import setup_tracking, start_run

log = logging.getLogger(__name__)

ADAPTED = "adapted"


def adapted_tags(spec: dict[str, Any], model_sha: str, base: Any | None) -> dict[str, str]:
    """The lineage of an adapted model folder's spec, as version tags (strings)."""
    a = spec["adapted"]
    target = a.get("target_accuracy") or {}
    return {
        "adapted": "true",
        "adapted_from": f"v{base.version}" if base is not None else "not registered",
        "adapted_from_sha256": str(a.get("from_model_sha256")),
        "adapt_methods": ",".join(a["methods"]),
        "target_data_path": a["unlabelled"]["path"],
        "target_data_sha256": a["unlabelled"]["sha256"],
        "target_images": str(a["unlabelled"]["count"]),
        "target_accuracy_before": str(target.get("before", "unknown")),
        "target_accuracy_after": str(target.get("after", "unknown")),
        "target_test_size": str(target.get("n", 0)),
        "model_sha256": model_sha,
        "data_hash": spec["data_hash"],
        "classes": json.dumps(spec["class_names"]),
        "candidate": "adapted",
    }


def adapted_card(name: str, version: str, tags: dict[str, str]) -> str:
    """The adapted version's model card (markdown)."""
    before, after = tags["target_accuracy_before"], tags["target_accuracy_after"]
    measured = (
        f"Target accuracy on the labelled target sample ({tags['target_test_size']} images): "
        f"{float(before):.3f} before, {float(after):.3f} after."
        if after != "unknown"
        else "Target accuracy is unknown: no labelled target sample (data.target_test) was given."
    )
    return "\n".join(
        [
            f"# {name} v{version} (adapted)",
            "",
            f"Adapted from {tags['adapted_from']} to the domain of `{tags['target_data_path']}` "
            f"({tags['target_images']} unlabelled images, sha256 "
            f"{tags['target_data_sha256'][:12]}) with: {tags['adapt_methods']}. No label of that "
            "domain was used to adapt it.",
            "",
            measured,
            "",
            "It did not pass the champion gates (they measure the training domain, where an "
            "adapted model may lose accuracy): serve it as `models:/" + name + "@adapted` where "
            "the new domain is.",
        ]
    )


def register_adapted(cfg: Config) -> RegisterResult | None:
    """Register ``adapt.out`` (when `adapt` kept a model) with alias ``adapted``."""
    from mlflow import MlflowClient

    folder = Path(cfg.adapt.out)
    if not (folder / SPEC_FILE).exists():
        return None
    model_sha = verify_weights(folder)
    spec = read_json(folder / SPEC_FILE)
    name = registered_model_name(cfg)
    mlflow = setup_tracking(cfg.tracking)
    client = MlflowClient()
    existing = find_version(client, name, model_sha)
    if existing is not None:
        client.set_registered_model_alias(name, ADAPTED, existing.version)
        return RegisterResult(name, str(existing.version), False, existing.run_id, existing.tags)
    base = find_version(client, name, spec["adapted"].get("from_model_sha256") or "-")
    tags = adapted_tags(spec, model_sha, base)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    run_tags = {"role": "registered-adapted", "model_sha256": model_sha}
    with start_run(mlflow, run_name=f"register-adapted-{name}", tags=run_tags) as run:
        mv = log_version(mlflow, client, name, folder, spec, tags, cfg)
        card = adapted_card(name, str(mv.version), tags)
        mlflow.log_text(card, "model_card.md")
    client.update_model_version(name, mv.version, description=card)
    client.set_registered_model_alias(name, ADAPTED, mv.version)
    log.info(
        "registered %s v%s (alias %s), adapted from %s",
        name,
        mv.version,
        ADAPTED,
        tags["adapted_from"],
    )
    return RegisterResult(name, str(mv.version), True, run.info.run_id, tags)
