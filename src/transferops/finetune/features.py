"""Pooled features of a frozen pretrained source: what the exact probe, the source ranking and
the drift check all read (one place for "load the source, wrap it in blocks, encode")."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from transferops.data.prepared import PreparedData
from transferops.finetune.cache import encode_prefix
from transferops.finetune.engine import autocast_for
from transferops.model.blocks import StagedNet
from transferops.model.families import build_staged
from transferops.model.inputs import Inputs, Preprocess, input_side, make_inputs, make_preprocess
from transferops.sources.pull import SourceModel, load_source

__all__ = ["frozen_features", "image_gflops"]


def _frozen_net(
    source_dir: Path | str,
    image_size: int | None,
    num_classes: int,
    modality: str,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[SourceModel, StagedNet, Preprocess]:
    """The pulled source (weights verified) as blocks in eval mode, placed on `device` in the
    memory format its inputs come in, and its input normalisation (with `precision`
    resolved as training resolves it)."""
    src = load_source(source_dir, image_size)
    torch.manual_seed(0)  # the (unused) head's init: nothing depends on it
    net = build_staged(
        src.model,
        src.family,
        num_classes,
        image_size=input_side(src.manifest, image_size) or 32,
        user_blocks=src.manifest.get("user_blocks"),
    ).eval()
    pre = make_preprocess(src.manifest, device, modality, precision=precision)
    pre.place(net, device)
    return src, net, pre


@torch.no_grad()
def frozen_features(
    source_dir: Path | str,
    splits: dict[str, PreparedData],
    image_size: int | None,
    max_length: int,
    device: torch.device,
    batch_size: int = 128,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """The pulled source's pooled features (float32, on the CPU) for each prepared split,
    its weights verified on load; computed in bf16 where `precision` (finetune.precision)
    says training's are, so a ranking's probe sees the features training's probe will."""
    first = next(iter(splits.values()))
    src, net, pre = _frozen_net(
        source_dir, image_size, len(first.class_names), first.modality, device, precision
    )
    out, amp = {}, autocast_for(device, pre.bf16)
    for name, data in splits.items():
        inputs = make_inputs(data, Path(source_dir), src.manifest, max_length).to(device)
        h = encode_prefix(net, inputs, net.num_blocks, pre, batch_size, amp=amp)
        out[name] = h.flatten(1).float().cpu()
    return out


@torch.no_grad()
def image_gflops(source_dir: Path | str, image_size: int) -> float:
    """Forward GFLOPs of the frozen source on one `image_size` image (after the upsampling to
    its input size, if any): the cost of every later epoch per image, counted, not timed (a
    count is the same on a busy machine)."""
    _, net, pre = _frozen_net(source_dir, image_size, 2, "image", torch.device("cpu"))
    x = Inputs(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(1))
    with FlopCounterMode(display=False) as counter:
        encode_prefix(net, x, net.num_blocks, pre, 1)
    return counter.get_total_flops() / 1e9
