"""A model folder in and out: what `train` writes, and every load reads, verified.

A model folder (``finetune.out``, a baseline run, a registered version's artifact) holds

- ``model.safetensors`` (:data:`WEIGHTS_FILE`): the StagedNet weights (nothing is pickled),
- ``model.json`` (:data:`SPEC_FILE`): everything needed to rebuild and feed it (source
  manifest, classes, image size and resize, tokenizer, params, data hash, val metrics) and
  the weights' sha256, checked before every load (:func:`verify_weights`),
- ``history.json``: per-epoch metrics; and ``hf/`` (config + tokenizer) for text models.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transferops.errors import IntegrityError
from transferops.model.blocks import Ensemble, StagedNet
from transferops.model.families import build_architecture, build_staged
from transferops.model.inputs import input_side
from transferops.runtime.artifacts import (
    atomic_dir,
    read_json,
    save_weights,
    sha256_file,
    write_json_atomic,
)

HF_DIR = "hf"  # a text model's config + tokenizer, in source and model folders alike
SPEC_FILE = "model.json"  # a model folder's spec
WEIGHTS_FILE = "model.safetensors"  # a model folder's weights


def save_model_folder(
    net: nn.Module,
    spec: dict[str, Any],
    history: list[dict],
    out: Path,
    source_dir: Path,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write a model folder atomically (weights, spec, history, tokenizer for text, and
    `extra` safetensors files such as LoRA adapters). The spec records the weights' sha256,
    which every load checks (:func:`verify_weights`)."""
    with atomic_dir(out) as tmp:
        save_weights(net, tmp / WEIGHTS_FILE)
        for name, tensors in (extra or {}).items():
            save_file(tensors, str(tmp / name))
        spec = spec | {"weights_sha256": sha256_file(tmp / WEIGHTS_FILE)}
        write_json_atomic(tmp / SPEC_FILE, spec)
        write_json_atomic(tmp / "history.json", history)
        if spec["modality"] == "text":  # config + tokenizer (not weights) to rebuild offline
            shutil.copytree(
                source_dir / HF_DIR,
                tmp / HF_DIR,
                ignore=shutil.ignore_patterns("*.safetensors", "*.bin"),
            )


def verify_weights(
    folder: Path | str,
    expected: str | None = None,
    recorded_by: str | None = None,
    shown: str | None = None,
) -> str:
    """The sha256 of a model folder's weights, checked against `expected` (the registry's
    ``model_sha256`` tag, named by `recorded_by`) or else the sha256 its spec recorded at
    save. Raises :class:`IntegrityError` naming the file (`shown`: where it came from, for a
    downloaded copy) on a mismatch: tampered or damaged weights are never scored,
    served, registered or exported."""
    weights = Path(folder) / WEIGHTS_FILE
    name = shown or str(weights)
    if not weights.exists():
        raise IntegrityError(
            f"{name} is missing: the model folder is incomplete; re-run `transferops train` "
            "(or register the model again)"
        )
    sha = sha256_file(weights)
    if expected is None:
        expected = read_json(Path(folder) / SPEC_FILE).get("weights_sha256")
        recorded_by = f"{Path(folder) / SPEC_FILE} when they were saved"
    if expected is not None and sha != expected:
        raise IntegrityError(
            f"{name}: sha256 {sha[:16]}... differs from {expected[:16]}... recorded in "
            f"{recorded_by}: the weights were modified or damaged. Refusing to use them; "
            "restore the file, or retrain and register again (`transferops run`)"
        )
    return sha


def rebuild_finetuned(path: Path | str) -> tuple[nn.Module, StagedNet | Ensemble, dict[str, Any]]:
    """The source architecture, the StagedNet around it (or the :class:`Ensemble` of them
    when the spec lists ``members``) and the spec of a model folder, its weights verified
    first (:func:`verify_weights`).

    The fine-tuned weights are loaded into the StagedNet, whose blocks are the architecture's
    own modules, so the architecture then holds the fine-tuned backbone (its original
    classifier, which the StagedNet replaced, keeps its initialisation); of an ensemble, the
    first member's.
    """
    path = Path(path)
    spec = read_json(path / SPEC_FILE)
    verify_weights(path)
    models, nets = [], []
    for _ in spec.get("members") or [None]:
        model, net = _architecture(path, spec)
        models.append(model)
        nets.append(net)
    net: StagedNet | Ensemble = Ensemble(nets) if spec.get("members") else nets[0]
    net.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
    return models[0], net, spec


def _architecture(path: Path, spec: dict[str, Any]) -> tuple[nn.Module, StagedNet]:
    src = spec["source"]
    side = input_side(src, spec.get("image_size"))
    if src["kind"] == "hf":
        from transformers import AutoConfig, AutoModel

        model = AutoModel.from_config(AutoConfig.from_pretrained(path / HF_DIR))
    else:
        model, _ = build_architecture(src["kind"], src["name"], side)
    net = build_staged(
        model,
        src["family"],
        len(spec["class_names"]),
        image_size=side or 32,
        user_blocks=src.get("user_blocks"),
    )
    return model, net


def save_member(ensemble_dir: Path | str, index: int, dst: Path, source_dir: Path) -> None:
    """Write member `index` of an ensemble's model folder as a model folder of its own (its
    spec, weights and history, as when it was trained alone): what a baseline run of the same
    seed reuses instead of training it again."""
    _, net, spec = rebuild_finetuned(ensemble_dir)
    assert isinstance(net, Ensemble)
    history = spec["members"][index].get("history", [])
    save_model_folder(net.members[index], member_spec(spec, index), history, dst, source_dir)


def member_spec(spec: dict[str, Any], index: int) -> dict[str, Any]:
    """The spec of member `index` of an ensemble's spec, as when it was trained alone (no
    temperature: the ensemble's was fitted to the average, not to it)."""
    member = {k: v for k, v in spec["members"][index].items() if k != "history"}
    drop = ("members", "temperature", "calibration", "weights_sha256")
    return {k: v for k, v in spec.items() if k not in drop} | member


def load_finetuned(path: Path | str) -> tuple[StagedNet | Ensemble, dict[str, Any]]:
    """Rebuild a fine-tuned model from its folder, in eval mode (no source download needed);
    its weights verified first."""
    _, net, spec = rebuild_finetuned(path)
    return net.eval(), spec
