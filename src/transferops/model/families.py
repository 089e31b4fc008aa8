"""Everything transferops knows about a model family, in one table (fastai's ``model_meta``).

A *family* is a set of architectures cut into blocks the same way. Each row says how to cut
it (the splitter in :mod:`transferops.model.blocks`), what input normalisation its
pretrained weights expect when the weights do not say, whether it runs channels_last, and
which pip package the architecture needs at inference time. Source pulls, block discovery,
preprocessing and the registered model's requirements all read this table; no other module
branches on a family name.

| family | architectures | blocks |
| --- | --- | --- |
| resnet | torchvision ResNet / ResNeXt / Wide ResNet | stem, layer1..layer4 |
| tv_features | torchvision MobileNet, EfficientNet, MNASNet | features[0..n-1] |
| tv_vit | torchvision ViT | embed, encoder layers |
| efficientnet_lite | efficientnet-lite-pytorch | stem, one per width stage, head conv |
| hf_text | Hugging Face BERT-style encoders | embeddings, encoder.layer.0..N-1 |
| pixels | the classical model: logistic regression on raw pixels (no backbone) | none |
| unknown | anything else, with ``source.blocks`` | the listed module names |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transferops.errors import SourceError
from transferops.model.blocks import (
    BlockSplit,
    StagedNet,
    split_efficientnet_lite,
    split_hf_text,
    split_pixels,
    split_resnet,
    split_tv_features,
    split_tv_vit,
    split_user,
)

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HALF = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # TF-Lite style (docs/ASSETS)
UNIT = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # pixels / 255, as sklearn saw them


@dataclass(frozen=True)
class Family:
    """Facts about one model family."""

    split: Callable[[Any, int], BlockSplit] | None  # (model, image size) -> blocks, pool, dim
    modality: str  # "image" | "text"
    norm: dict[str, list[float]] | None  # input normalisation when the weights carry none
    channels_last: bool  # faster for convolutions (GPU and CPU); a no-op for attention
    requirement: str  # the pip package that builds the architecture at inference time
    prefixes: tuple[str, ...] = ()  # torchvision model names of this family
    # bf16 autocast pays on a CPU with native bf16 (finetune.precision auto): time in large
    # matmuls. Measured (bench/precision.py): MiniLM 1.9x per training step with Intel AMX,
    # 2.25x with AVX512-BF16 (AMD EPYC), 3x per inference pass on both; EfficientNet-Lite0's
    # depthwise convolutions train 1.6-1.7x *slower* in bf16 on both
    cpu_bf16: bool = False
    # The pretrained blocks' LR relative to the new head's (finetune.block_lr_scale auto),
    # before layer_decay. Attention encoders fine-tune at a small share of a head's AdamW
    # LR: at 1 (MiniLM's top layer at 1.8e-3 for the head's 0.003) the recipe fell 4-5
    # points below the exact probe on two unseen text cases; 0.03 lifted it 3-5 points
    # there, seed spreads 1.2-1.5 points (bench/text_lr.py, bench/RESULTS.md)
    block_lr_scale: float = 1.0


FAMILIES: dict[str, Family] = {
    "resnet": Family(
        split_resnet, "image", IMAGENET, True, "torchvision", ("resnet", "resnext", "wide_")
    ),
    "tv_features": Family(
        split_tv_features,
        "image",
        IMAGENET,
        True,
        "torchvision",
        ("mobilenet", "efficientnet", "mnasnet"),
    ),
    "tv_vit": Family(split_tv_vit, "image", IMAGENET, False, "torchvision", ("vit_",)),
    "efficientnet_lite": Family(
        split_efficientnet_lite, "image", HALF, True, "efficientnet-lite-pytorch"
    ),
    "hf_text": Family(
        split_hf_text, "text", None, False, "transformers", cpu_bf16=True, block_lr_scale=0.03
    ),
    "pixels": Family(split_pixels, "image", UNIT, False, "torch"),
    "unknown": Family(None, "image", IMAGENET, True, "torchvision"),
}


def family(name: str) -> Family:
    """The table row of family `name` (from a manifest or a model folder)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise SourceError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: Intel AMX or AVX512-BF16 (both measured
    faster for text encoders, bench/precision.py). Without either bf16 is emulated and
    slower than float32."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def runs_bf16(precision: str, device: torch.device, fam: Family) -> bool:
    """Whether training on `device` autocasts to bf16 (finetune.precision): always for
    ``bf16``, never for ``fp32``; for ``auto`` on a GPU, and on a CPU with native bf16 for the
    families whose time is in matmuls (`Family.cpu_bf16`). Weights, optimizer state and the
    loss stay float32; serving (predict, the pyfunc, ONNX) is float32 everywhere."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and fam.cpu_bf16 and cpu_has_native_bf16()


def torchvision_family(name: str) -> str:
    """The family of a torchvision classification model name ("unknown" if none fits)."""
    for fam, row in FAMILIES.items():
        if row.prefixes and name.startswith(row.prefixes):
            return fam
    return "unknown"


def build_architecture(
    kind: str, name: str, image_size: int | None = None
) -> tuple[nn.Module, str]:
    """An untrained instance of an image architecture and its family.

    `image_size` matters only for EfficientNet-Lite, whose "same" padding is static (computed
    for one input size; it holds no weights, so any size loads the same state dict). Kind
    ``classical`` has no architecture: its model is the head alone (family ``pixels``).
    """
    if kind == "classical":
        return nn.Identity(), "pixels"
    if kind == "torchvision" or name.startswith("torchvision:"):
        import torchvision

        tv_name = name.removeprefix("torchvision:")
        try:
            model = torchvision.models.get_model(tv_name, weights=None)
        except ValueError:
            raise SourceError(
                f"source.name: {tv_name!r} is not a torchvision model; e.g. resnet18, "
                "mobilenet_v3_small, efficientnet_b0, vit_b_16"
            ) from None
        return model, torchvision_family(tv_name)
    if kind == "efficientnet_lite" or name.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet

        try:
            extra = {"image_size": image_size} if image_size else {}
            return EfficientNet.from_name(name, **extra), "efficientnet_lite"
        except ValueError as exc:
            raise SourceError(f"source.name: {exc}") from None
    raise SourceError(
        f"source.name: cannot build architecture {name!r} for kind {kind!r}; for kind local use "
        "torchvision:<name> or efficientnet-lite0..4"
    )


def discover(
    model: nn.Module,
    family_name: str,
    image_size: int = 32,
    user_blocks: list[list[str]] | None = None,
) -> BlockSplit:
    """Blocks, pool and feature dim of a source model (``source.blocks`` wins when given)."""
    if user_blocks:
        return split_user(model, user_blocks, image_size)
    split = family(family_name).split
    if split is None:
        raise SourceError(
            f"no block discovery for this architecture (family {family_name!r}); give "
            "source.blocks: a list of blocks, each a list of module names applied in order "
            "(input -> output)"
        )
    return split(model, image_size)


def build_staged(
    model: nn.Module,
    family_name: str,
    num_classes: int,
    dropout: float = 0.0,
    image_size: int = 32,
    user_blocks: list[list[str]] | None = None,
) -> StagedNet:
    """Wrap a source model as a StagedNet with a fresh head for `num_classes`."""
    blocks, pool, dim = discover(model, family_name, image_size, user_blocks)
    return StagedNet(blocks, pool, dim, num_classes, dropout, family_name)
