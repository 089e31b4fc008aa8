"""Pooled features of a frozen pretrained source: what the exact probe, the source ranking and
the drift check all read (one place for "load the source, wrap it in blocks, encode")."""

from __future__ import annotations

from pathlib import Path

import torch

from transferops.data.prepared import PreparedData
from transferops.finetune.cache import encode_prefix
from transferops.finetune.engine import autocast_for
from transferops.model.families import build_staged
from transferops.model.inputs import make_inputs, make_preprocess
from transferops.sources.pull import load_source


@torch.no_grad()
def frozen_features(
    source_dir: Path | str,
    splits: dict[str, PreparedData],
    image_size: int | None,
    max_length: int,
    device: torch.device,
    batch_size: int = 128,
) -> dict[str, torch.Tensor]:
    """The pulled source's pooled features (float32, on the CPU) for each prepared split,
    its weights verified on load."""
    src = load_source(source_dir, image_size)
    first = next(iter(splits.values()))
    torch.manual_seed(0)  # the (unused) head's init: nothing depends on it
    net = build_staged(
        src.model,
        src.family,
        len(first.class_names),
        image_size=image_size or 32,
        user_blocks=src.manifest.get("user_blocks"),
    ).eval()
    pre = make_preprocess(src.manifest, device, first.modality)
    pre.place(net, device)
    out = {}
    for name, data in splits.items():
        inputs = make_inputs(data, Path(source_dir), src.manifest, max_length).to(device)
        h = encode_prefix(net, inputs, net.num_blocks, pre, batch_size, amp=autocast_for(device))
        out[name] = h.flatten(1).float().cpu()
    return out
