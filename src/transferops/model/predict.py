"""Predicting with a saved model folder (``finetune.out`` or a baseline run).

Two callers, one code path: `evaluate` scores prepared splits, and the registered MLflow model
(:mod:`transferops.model.serving`) scores raw images or texts. Raw inputs go through the same
decoder as `prepare` and the same normalisation as training, so a served model sees exactly
what the fine-tuned model saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transferops.errors import DataError
from transferops.model.blocks import StagedNet
from transferops.model.folder import load_finetuned
from transferops.model.inputs import (
    Inputs,
    SplitTensors,
    decode_image,
    folder_inputs,
    make_preprocess,
    spec_max_length,
    tokenize,
)


@torch.no_grad()
def predict_probs(
    net: StagedNet,
    spec: dict[str, Any],
    inputs: Inputs,
    device: torch.device,
    batch_size: int | None = None,
) -> np.ndarray:
    """Class probabilities [N, C] of `net` (in eval mode) on `inputs` (batches of
    `batch_size`, else what suits the device: :meth:`Inputs.inference_batch`)."""
    pre = make_preprocess(spec["source"], device, spec["modality"])  # no augmentation
    temperature = float(spec.get("temperature", 1.0))  # fitted on val (model.calibration)
    pre.place(net, device).eval()
    order = inputs.inference_order()  # texts by length: little padding per batch
    out = []
    batch_size = batch_size or inputs.inference_batch(256, pre.size)
    for i in range(0, len(inputs), batch_size):
        x, ctx = inputs.batch(order[i : i + batch_size])
        ctx = ctx.to(device) if ctx is not None else None
        logits = net(pre(x.to(device), False, None), ctx).float()
        out.append(torch.softmax(logits / temperature, 1).cpu())
    if not out:
        return np.zeros((0, len(spec["class_names"])), dtype=np.float32)
    return torch.cat(out)[torch.argsort(order)].numpy()


def predict_split(
    folder: Path, data: SplitTensors, device: torch.device, temperature: float | None = None
) -> np.ndarray:
    """Class probabilities of the model saved in `folder` on a prepared split (its inputs
    built as training built them), at the folder's fitted temperature, or at `temperature`
    (1.0: the uncalibrated probabilities)."""
    net, spec = load_finetuned(folder)
    inputs = folder_inputs(data, folder, spec)
    t = spec.get("temperature", 1.0) if temperature is None else temperature
    return predict_probs(net, spec | {"temperature": t}, inputs, device)


def raw_inputs(
    spec: dict[str, Any],
    model_dir: Path,
    items: list[Any],
    skipped: list[tuple[int, str]] | None = None,
) -> Inputs:
    """Raw examples -> model inputs: image paths or encoded bytes, or texts. An image that
    cannot be decoded raises :class:`DataError`, unless `skipped` is given: then it is left
    out and (its index, why) appended there."""
    n = len(items)
    if spec["modality"] == "text":
        bad = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if bad:
            raise DataError(f"text input: items {bad[:5]} are not strings")
        ids, mask = tokenize(list(items), model_dir, spec["source"], spec_max_length(spec))
        return Inputs(ids, torch.zeros(n, dtype=torch.int64), mask)  # labels: unused
    size = spec.get("image_size") or 32
    resize = spec.get("image_resize", "crop")
    arrays = []
    for i, item in enumerate(items):
        if not isinstance(item, bytes | str | Path):
            raise DataError(
                f"image input {i}: expected a file path or the file's bytes, got "
                f"{type(item).__name__}"
            )
        try:
            arrays.append(decode_image(item, size, resize))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if skipped is None:
                what = item if isinstance(item, str | Path) else f"{len(item)} bytes"
                raise DataError(f"image input {i} ({what}): cannot be decoded ({exc})") from None
            skipped.append((i, str(exc)))
    x = (
        torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        if arrays
        else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    )
    return Inputs(x, torch.zeros(len(arrays), dtype=torch.int64))
