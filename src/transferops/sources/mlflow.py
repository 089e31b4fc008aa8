"""``source.kind: mlflow``: a model `transferops register` put in an MLflow registry.

``source.name`` is ``models:/<name>@<alias>`` or ``models:/<name>/<version>``. The pull takes
its fine-tuned backbone (blocks, input spec, normalisation or tokenizer of the model it was
tuned from) and drops its head: the next fine-tune gets a new one for its own classes. The
download checks the weights against the version's ``model_sha256`` tag. An alias is resolved
on every pull (:func:`resolve`), so a moved alias is pulled again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from transferops.config import SourceConfig
from transferops.errors import SourceError
from transferops.model.folder import HF_DIR, SPEC_FILE, rebuild_finetuned
from transferops.registry.client import download_model_folder, registered_version
from transferops.runtime.artifacts import read_json
from transferops.runtime.redact import mask
from transferops.runtime.tracking import absolute_uri
from transferops.sources.manifest import Pulled, torch_weights

log = logging.getLogger(__name__)


def resolve(cfg: SourceConfig, registry_uri: str | None) -> dict[str, Any]:
    """The registered version ``source.name`` points at now."""
    uri = absolute_uri(registry_uri or cfg.registry_uri or "sqlite:///mlflow.db")
    return registered_version(cfg.name, uri)


def load(cfg: SourceConfig, workdir: Path, reg: dict[str, Any]) -> Pulled:
    """Download version `reg` into `workdir`, check it, and rebuild its backbone."""
    label = f"{reg['model']} v{reg['version']}"
    model_dir = download_model_folder(reg["model"], reg["version"], workdir, reg["registry_uri"])
    if model_dir is None:
        raise SourceError(
            f"source.name: {cfg.name} ({label}) is not a transferops model (no fine-tuned "
            "model folder in its artifacts); kind mlflow takes models registered by "
            "`transferops register`"
        )
    members = read_json(model_dir / SPEC_FILE).get("members")
    if members:
        log.info(
            "%s is an ensemble of %d fine-tuned networks (finetune.ensemble): a source is one "
            "backbone, its first member's (seed %s, the search's best trial)",
            label,
            len(members),
            members[0]["finetune"]["seed"],
        )
    if read_json(model_dir / SPEC_FILE).get("candidate") == "classical":
        raise SourceError(
            f"source.name: {cfg.name} ({label}) is the classical model (logistic regression on "
            "pixels, registered because fine-tuning did not beat it): it has no backbone to "
            "fine-tune; point source.name at a version fine-tuned from a network"
        )
    # The architecture's own classifier is not part of the fine-tuned model: seed its
    # (unused) initialisation so that pulling the same version twice gives the same file.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, spec = rebuild_finetuned(model_dir)
    src = spec["source"]

    def save(folder: Path) -> str:
        if src["kind"] == "hf":
            shutil.copytree(model_dir / HF_DIR, folder / HF_DIR)  # config + tokenizer
            model.save_pretrained(folder / HF_DIR, safe_serialization=True)
            return f"{HF_DIR}/model.safetensors"
        return torch_weights(model)(folder)

    alias = f" (@{reg['alias']})" if reg["alias"] else ""
    registered = {
        **reg,
        "registry_uri": mask(reg["registry_uri"]),  # the manifest is a file users commit
        "class_names": spec["class_names"],
        "data_hash": spec["data_hash"],
    }
    return Pulled(
        src["kind"],
        src["name"],
        model,
        src["family"],
        f"mlflow:{label}{alias}, tuned from {src['origin']}",
        src["input"],
        save,
        src.get("user_blocks"),
        {"registered": registered},
    )
