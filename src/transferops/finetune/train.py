"""`transferops train`: config -> fine-tuned model folder, and reloading that folder.

``train_from_config`` is what the CLI, DVC and (later) Prefect call. It validates the
configuration against the prepared data and the pulled source *before* any training, reads
only the train and val splits, and writes ``finetune.out/``:

- ``model.safetensors``: the fine-tuned StagedNet weights,
- ``model.json``: everything needed to rebuild and run it (source manifest, classes, input
  spec, params, data hash, val metrics),
- ``history.json``: per-epoch metrics; and ``finetune.metrics`` (JSON) for DVC.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from transferops.artifacts import (
    atomic_dir,
    read_json,
    save_weights,
    sha256_json,
    write_json_atomic,
)
from transferops.config import Config, FinetuneConfig, check_depth
from transferops.data.prepare import PreparedData, load_prepared, read_manifest
from transferops.errors import ConfigError
from transferops.finetune.blocks import StagedNet, build_staged
from transferops.finetune.engine import EpochHook, Inputs, Preprocess, TrainResult, finetune
from transferops.sources import HF_DIR, SourceModel, build_architecture, load_source, random_init

log = logging.getLogger(__name__)

__all__ = [
    "TrainResult",
    "build_net",
    "load_finetuned",
    "make_inputs",
    "pick_device",
    "rebuild_finetuned",
    "tokenize",
    "train_from_config",
    "train_model",
]


def pick_device(choice: str) -> torch.device:
    """cuda when asked for or available (auto), else cpu."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device: cuda requested but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def build_net(
    source: SourceModel, num_classes: int, cfg: FinetuneConfig, image_size: int = 32
) -> StagedNet:
    """The source model as blocks + a new head (head init seeded by finetune.seed)."""
    torch.manual_seed(cfg.seed)
    return build_staged(
        source.model,
        source.family,
        num_classes,
        dropout=cfg.dropout,
        image_size=image_size,
        user_blocks=source.manifest.get("user_blocks"),
    )


def make_preprocess(
    manifest: dict[str, Any], cfg: FinetuneConfig, device: torch.device, modality: str
) -> Preprocess:
    """Normalisation from the source manifest; augmentation from params."""
    inp = manifest["input"]
    return Preprocess(
        modality=modality,
        mean=tuple(inp.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(inp.get("std", (0.5, 0.5, 0.5))),
        augment=cfg.augment,
        channels_last=device.type == "cuda"
        and modality == "image"
        and manifest["family"] not in ("tv_vit", "hf_text"),
    )


def tokenize(
    texts: list[str], model_dir: Path, manifest: dict[str, Any], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with the tokenizer saved beside the weights."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(model_dir) / manifest["input"]["tokenizer"])
    enc = tok(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def make_inputs(
    data: PreparedData, source_dir: Path, manifest: dict[str, Any], max_length: int
) -> Inputs:
    """Tensors for one split; texts are tokenised once with the source's tokenizer."""
    if data.modality == "image":
        assert data.images is not None
        return Inputs(data.images, data.labels)
    ids, mask = tokenize(data.texts or [], source_dir, manifest, max_length)
    return Inputs(ids, data.labels, mask)


def _check_compatible(modality: str, manifest: dict[str, Any]) -> None:
    kind = manifest["input"]["type"]
    if kind != modality:
        raise ConfigError(
            f"source ({manifest['origin']}) takes {kind} input but the prepared data is "
            f"{modality}: choose a {modality} source in params.yaml `source:`"
        )


def train_model(
    cfg: Config,
    on_epoch_end: EpochHook | None = None,
    checkpoint: Path | None = None,
    feature_store: dict[tuple, torch.Tensor] | None = None,
    pretrained: bool = True,
) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune per `cfg` on train, score on val (never test). Returns (result, spec).

    `pretrained=False` trains the same architecture from a random init (seeded by
    finetune.seed): the from-scratch baseline.
    """
    data_manifest = read_manifest(cfg.data.out)
    image_size = data_manifest.get("image_size") or None
    source = load_source(cfg.source.out, image_size)  # verifies the weights' sha256
    if not pretrained:
        torch.manual_seed(cfg.finetune.seed)
        source = random_init(source, image_size)
    check_depth(cfg, source.manifest["num_blocks"], search=False)
    _check_compatible(data_manifest["modality"], source.manifest)
    device = pick_device(cfg.finetune.device)
    train = load_prepared(cfg.data.out, "train")
    val = load_prepared(cfg.data.out, "val")
    net = build_net(source, len(train.class_names), cfg.finetune, image_size or 32)
    pre = make_preprocess(source.manifest, cfg.finetune, device, train.modality)
    spec = {
        "format_version": 1,
        "source": source.manifest,
        "class_names": train.class_names,
        "modality": train.modality,
        "image_size": data_manifest.get("image_size"),
        # how raw images were fitted to image_size (the registered model does the same)
        "image_resize": (data_manifest.get("params", {}).get("image") or {}).get("resize", "crop"),
        "input": source.manifest["input"],
        "max_length": cfg.finetune.max_length,
        "finetune": cfg.finetune.model_dump(mode="json"),
        "data_hash": data_manifest["data_hash"],
    }
    # What determines the training trajectory (output paths do not): a checkpoint resumes
    # only a run with the same fingerprint.
    fingerprint = sha256_json(
        {
            "source": source.manifest["sha256"],
            "pretrained": pretrained,
            "data_hash": spec["data_hash"],
            "finetune": cfg.finetune.trajectory_params(),
        }
    )
    res = finetune(
        net,
        make_inputs(train, cfg.source.out, source.manifest, cfg.finetune.max_length),
        make_inputs(val, cfg.source.out, source.manifest, cfg.finetune.max_length),
        cfg.finetune,
        pre,
        device,
        on_epoch_end=on_epoch_end,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        feature_store=feature_store,
    )
    spec["val_accuracy"] = res.best_val_accuracy
    spec["val_loss"] = res.best_val_loss
    return res, spec


def save_finetuned(res: TrainResult, spec: dict[str, Any], out: Path, source_dir: Path) -> None:
    """Write the model folder atomically (weights, spec, history, tokenizer for text)."""
    with atomic_dir(out) as tmp:
        save_weights(res.net, tmp / "model.safetensors")
        write_json_atomic(tmp / "model.json", spec)
        write_json_atomic(tmp / "history.json", res.history)
        if spec["modality"] == "text":  # config + tokenizer (not weights) to rebuild offline
            shutil.copytree(
                source_dir / HF_DIR,
                tmp / HF_DIR,
                ignore=shutil.ignore_patterns("*.safetensors", "*.bin"),
            )


def train_from_config(
    cfg: Config, resume: bool = True, on_epoch_end: EpochHook | None = None
) -> TrainResult:
    """`transferops train`: fine-tune with fixed params, write finetune.out and metrics."""
    fc = cfg.finetune
    checkpoint = Path(fc.checkpoint_dir) / "last.pt"
    if not resume and checkpoint.exists():
        checkpoint.unlink()
    res, spec = train_model(cfg, on_epoch_end=on_epoch_end, checkpoint=checkpoint)
    save_finetuned(res, spec, Path(fc.out), Path(cfg.source.out))
    write_json_atomic(
        Path(fc.metrics),
        {
            "val_accuracy": res.best_val_accuracy,
            "val_loss": res.best_val_loss,
            "unfreeze_depth": res.unfreeze_depth,
            "epochs": res.epochs_run,
            "seconds": round(res.seconds, 2),
        },
    )
    log.info("fine-tuned model written to %s (val accuracy %.4f)", fc.out, res.best_val_accuracy)
    return res


def rebuild_finetuned(path: Path | str) -> tuple[nn.Module, StagedNet, dict[str, Any]]:
    """The source architecture, the StagedNet around it and the spec of a model folder.

    The fine-tuned weights are loaded into the StagedNet, whose blocks are the architecture's
    own modules, so the architecture then holds the fine-tuned backbone (its original
    classifier, which the StagedNet replaced, keeps its initialisation).
    """
    path = Path(path)
    spec = read_json(path / "model.json")
    src = spec["source"]
    if src["kind"] == "hf":
        from transformers import AutoConfig, AutoModel

        model = AutoModel.from_config(AutoConfig.from_pretrained(path / HF_DIR))
    else:
        model, _ = build_architecture(src["kind"], src["name"], spec.get("image_size"))
    net = build_staged(
        model,
        src["family"],
        len(spec["class_names"]),
        image_size=spec.get("image_size") or 32,
        user_blocks=src.get("user_blocks"),
    )
    net.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model, net, spec


def load_finetuned(path: Path | str) -> tuple[StagedNet, dict[str, Any]]:
    """Rebuild a fine-tuned model from its folder (no source download needed)."""
    _, net, spec = rebuild_finetuned(path)
    return net.eval(), spec
