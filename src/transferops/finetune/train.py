"""`transferops train`: config -> fine-tuned model folder.

``train_from_config`` is what the CLI, DVC and Prefect call. It validates the configuration
against the prepared data and the pulled source *before* any training, reads only the train
and val splits, and writes ``finetune.out/`` (a model folder, see :mod:`transferops.model_io`)
and ``finetune.metrics`` (JSON) for DVC.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from transferops.artifacts import sha256_json, write_json_atomic
from transferops.config import Config, FinetuneConfig, check_depth
from transferops.data.prepare import load_prepared, read_manifest
from transferops.errors import ConfigError
from transferops.families import build_staged
from transferops.finetune.adapters import ADAPTER_FILE, adapter_weights, add_lora, merge_adapters
from transferops.finetune.blocks import StagedNet
from transferops.finetune.engine import EpochHook, TrainResult, finetune
from transferops.model_io import make_inputs, make_preprocess, pick_device, save_model_folder
from transferops.sources import SourceModel, load_source, random_init

log = logging.getLogger(__name__)


def build_net(
    source: SourceModel, num_classes: int, cfg: FinetuneConfig, image_size: int = 32
) -> StagedNet:
    """The source model as blocks + a new head (head init seeded by finetune.seed), with
    LoRA adapters injected first when finetune.adapter is lora."""
    torch.manual_seed(cfg.seed)
    model = add_lora(source.model, cfg, source.family) if cfg.adapter == "lora" else source.model
    return build_staged(
        model,
        source.family,
        num_classes,
        dropout=cfg.dropout,
        image_size=image_size,
        user_blocks=source.manifest.get("user_blocks"),
    )


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
    pre = make_preprocess(source.manifest, device, train.modality, cfg.finetune.augment)
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
    """Write a trained model's folder (weights, spec, history) atomically; LoRA adapters are
    saved alone and merged into the weights (see finetune/adapters.py)."""
    extra = {}
    if spec["finetune"].get("adapter") == "lora":
        extra[ADAPTER_FILE] = adapter_weights(res.net)
        merge_adapters(res.net)
    save_model_folder(res.net, spec, res.history, out, source_dir, extra)


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
    checkpoint.unlink(missing_ok=True)  # the model is safe: 50+ MB of optimizer state is not
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
