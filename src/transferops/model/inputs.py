"""What a model takes in: the one image decoder (``prepare`` and the served model both use
it), the source's input normalisation (with augmentation, on the training device),
tokenising, and the device. No training code here (Made-With-ML's ``predict.py`` is the
model): a registered model ships this module.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from transferops.errors import ConfigError
from transferops.model.families import family, runs_bf16

GROUP_BATCHES = 16  # batches per length-sorted chunk of a text training epoch
CPU_BATCH_SIDE = 4096  # images per CPU inference batch x image side (Inputs.inference_batch)


# ------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """One split as tensors: images uint8 [N,3,H,W] or token ids [N,L] (+ mask), labels [N].

    Texts are stored padded to the split's longest but batched to the batch's longest
    (:meth:`batch`): attention cost grows with the padded width, so one long text must not
    make every batch pay for it."""

    x: torch.Tensor
    y: torch.Tensor
    ctx: torch.Tensor | None = None  # attention mask for text
    lengths: torch.Tensor | None = None  # tokens per text, on the CPU (no host sync per batch)

    def __post_init__(self) -> None:
        if self.ctx is not None and self.lengths is None:
            self.lengths = self.ctx.sum(1).cpu()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inference_batch(self, default: int, side: int | None = None) -> int:
        """Examples per no-grad forward pass. Images on the CPU: about 4096 / side (64 at 64
        px, 32 at 128 px), whose activations stay in cache: 1.1-1.2x (64 px) and 1.7-2.1x
        (128 px) faster than batches of 128 (bench/eval_batch.py); `side` = the side the
        network sees when the model upsamples (:attr:`Preprocess.size`). Texts, GPUs:
        `default`."""
        if self.ctx is not None or self.x.device.type != "cpu" or self.x.dim() != 4:
            return default
        return max(8, CPU_BATCH_SIDE // int(side or self.x.shape[-1]))

    def to(self, device: torch.device) -> Inputs:
        ctx = self.ctx.to(device) if self.ctx is not None else None
        return Inputs(self.x.to(device), self.y.to(device), ctx, self.lengths)

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x, ctx) of the examples at `idx` (a slice or a CPU index tensor), texts cut to
        the longest text among them."""
        if self.ctx is None or self.lengths is None:
            return self.x[idx], None
        lengths = self.lengths[idx]
        width = max(1, int(lengths.max())) if lengths.numel() else 1
        return self.x[idx, :width], self.ctx[idx, :width]

    def train_order(self, perm: torch.Tensor, batch_size: int) -> torch.Tensor:
        """A shuffled order whose batches hold texts of similar length (what Hugging Face's
        ``group_by_length`` does): each chunk of ``GROUP_BATCHES`` batches of `perm` sorted by
        length. Sets smaller than one chunk keep `perm`: they are cheap, and grouping them
        would fix each batch's members for every epoch."""
        chunk = GROUP_BATCHES * batch_size
        if self.lengths is None or len(perm) <= chunk:
            return perm
        parts = [perm[i : i + chunk] for i in range(0, len(perm), chunk)]
        return torch.cat([p[torch.argsort(self.lengths[p], stable=True)] for p in parts])

    def inference_order(self) -> torch.Tensor:
        """An order of the examples for batched inference: texts by length, so a batch holds
        texts of similar length and little padding (undo with ``argsort``)."""
        if self.lengths is None:
            return torch.arange(len(self))
        return torch.argsort(self.lengths, stable=True)


def fit_width(h: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
    """Cached text features [B, L, H] cut to the width of their batch's mask (pooled
    features [B, H] and image features pass unchanged)."""
    return h[:, : ctx.shape[1]] if ctx is not None and h.dim() == 3 else h


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG, TIFF) scaled to 8 bits: Pillow's own conversion clips every
    value above 255, which turns a 16-bit image almost white."""
    if not (im.mode == "I" or im.mode.startswith("I;16")):
        return im
    a = np.asarray(im, dtype=np.float64)
    # "I;16*" is 16-bit by definition; "I" (32-bit) holds 16-bit data when above 8 bits
    scale = 257.0 if im.mode != "I" or a.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(a / scale + 0.5, 0, 255).astype(np.uint8), "L")


def _on_white(im: Image.Image) -> Image.Image:
    """An image with transparency laid on white, as it shows on a page: dropping the alpha
    channel instead exposes whatever colour the transparent pixels hold (often black)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im


def decode_image(src: Path | str | bytes, size: int, resize: str) -> np.ndarray:
    """One image file (a path or its encoded bytes) -> size x size x 3 uint8 RGB.

    The one decoder: `prepare` uses it for the dataset, the registered model for raw inputs.
    """
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        # A photo is often 20-50x the side kept: let the JPEG decoder scale by 1/2..1/8 in
        # the DCT, never below `size` on either side (9-11x less CPU on a 12-MP photo; the
        # pixels move < 1 grey level on average). A no-op for other formats.
        im.draft(im.mode, (size, size))
        im = ImageOps.exif_transpose(im)
        im = _on_white(_to_8bit(im)).convert("RGB")
        if resize == "crop":
            im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
        else:
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


@dataclass
class Preprocess:
    """uint8 images -> normalised float on the training device, with optional augmentation."""

    modality: str
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: str = "none"
    channels_last: bool = False
    size: int | None = None  # the network's input side, when the ranking chose one above the
    # prepared images' (:func:`input_side`): images are upsampled to it here, so training,
    # `predict`, the pyfunc and ONNX all resize the same way
    bf16: bool = False  # training and its feature passes autocast to bf16 (runs_bf16)

    def __call__(self, x: torch.Tensor, train: bool, gen: torch.Generator | None) -> torch.Tensor:
        if self.modality != "image":
            return x
        x = x.float().div_(255.0)
        if train and self.augment != "none":
            x = flip_crop(x, gen, flip=self.augment == "flip_crop")
        if self.size and x.shape[-1] != self.size:
            # upsampling only (the ranking never picks a side below the prepared one): no
            # antialias needed, and ONNX opset 17 exports bilinear without it
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def place(self, net: nn.Module, device: torch.device) -> nn.Module:
        """`net` on `device`, in the memory format these inputs come in (mixed formats make
        every convolution convert its input)."""
        net.to(device)
        return net.to(memory_format=torch.channels_last) if self.channels_last else net


def flip_crop(x: torch.Tensor, gen: torch.Generator | None, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip (unless `flip` is False: digits and text are not mirror
    images) + random crop with 1/8 padding, vectorised on the device."""
    n, c, h, w = x.shape
    dev = x.device
    # Random numbers come from `gen` on the CPU, so a run is the same on any device.
    if flip:
        mirror = torch.rand(n, generator=gen, device="cpu").to(dev) < 0.5
        x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    iy = (torch.arange(h, device=dev).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1)
    ix = (torch.arange(w, device=dev).view(1, w) + dx.view(n, 1)).view(n, 1, 1, w)
    rows = torch.arange(n, device=dev).view(n, 1, 1, 1)
    return xp[rows, torch.arange(c, device=dev).view(1, c, 1, 1), iy, ix]


def make_preprocess(
    manifest: dict[str, Any],
    device: torch.device,
    modality: str,
    augment: str = "none",
    precision: str = "fp32",
) -> Preprocess:
    """The source's input normalisation (from its manifest); channels_last for the families
    whose convolutions run faster so, on the GPU and on the CPU alike (oneDNN: 1.4-1.6x per
    training run, bench/memory_format.py); bf16 autocast where `precision`
    (finetune.precision) resolves to it on `device` for the family (:func:`runs_bf16`)."""
    inp = manifest["input"]
    fam = family(manifest["family"])
    return Preprocess(
        modality=modality,
        mean=tuple(inp.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(inp.get("std", (0.5, 0.5, 0.5))),
        augment=augment,
        channels_last=modality == "image" and fam.channels_last,
        size=inp.get("size") if modality == "image" else None,
        bf16=runs_bf16(precision, device, fam),
    )


def input_side(source: dict[str, Any], image_size: int | None) -> int | None:
    """The side of the images the network sees: the input size the source ranking chose
    (``input.size`` in the pulled source's manifest; :class:`Preprocess` upsamples to it), else
    the prepared images' own ``image_size``. What an architecture is built for (EfficientNet-
    Lite's "same" padding is computed from it)."""
    return (source.get("input") or {}).get("size") or image_size


def tokenize(
    texts: list[str], model_dir: Path, manifest: dict[str, Any], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with the tokenizer saved beside the weights."""
    tok = load_tokenizer(model_dir, manifest)
    enc = tok(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def load_tokenizer(model_dir: Path, manifest: dict[str, Any]) -> Any:
    """The tokenizer saved beside a text model's weights (its manifest or spec names where)."""
    from transformers import AutoTokenizer  # text models only: image serving never needs it

    return AutoTokenizer.from_pretrained(Path(model_dir) / manifest["input"]["tokenizer"])


def text_fit(
    texts: list[str], model_dir: Path, manifest: dict[str, Any], max_length: int
) -> dict[str, float]:
    """How the source's tokenizer sees `texts`: their length in tokens (median, 90th
    percentile), the share longer than `max_length` (cut when tokenised: the model never
    sees their ends), and the share of word pieces it does not know (``[UNK]``: a script or
    language outside its vocabulary)."""
    tok = load_tokenizer(model_dir, manifest)
    ids = tok(texts, truncation=False, verbose=False)["input_ids"] if texts else []
    lengths = np.array([len(i) for i in ids] or [0])
    special = len(tok("")["input_ids"])  # [CLS] and [SEP] around every text
    pieces = max(1, int(lengths.sum()) - special * len(ids))
    unknown = sum(i.count(tok.unk_token_id) for i in ids) if tok.unk_token_id is not None else 0
    return {
        "median_tokens": float(np.median(lengths)),
        "p90_tokens": float(np.percentile(lengths, 90)),
        "cut": float((lengths > max_length).mean()),
        "unknown": unknown / pieces,
    }


class SplitTensors(Protocol):
    """A prepared split as :func:`make_inputs` reads it (``data.prepared.PreparedData``)."""

    modality: str
    images: torch.Tensor | None
    texts: list[str] | None
    labels: torch.Tensor


def make_inputs(
    data: SplitTensors, source_dir: Path, manifest: dict[str, Any], max_length: int
) -> Inputs:
    """Tensors for one prepared split; texts are tokenised with the source's tokenizer."""
    if data.modality == "image":
        assert data.images is not None
        return Inputs(data.images, data.labels)
    ids, mask = tokenize(data.texts or [], source_dir, manifest, max_length)
    return Inputs(ids, data.labels, mask)


def spec_max_length(spec: dict[str, Any]) -> int:
    """Tokens per example the model folder with `spec` was trained with (64, the default,
    for folders written before the spec recorded it)."""
    return spec.get("max_length", 64)


def folder_inputs(data: SplitTensors, model_dir: Path, spec: dict[str, Any]) -> Inputs:
    """A prepared split as the model saved in `model_dir` (its spec: `spec`) takes it."""
    return make_inputs(data, model_dir, spec["source"], spec_max_length(spec))


def pick_device(choice: str) -> torch.device:
    """cuda when asked for or available (auto), else cpu."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune.device: cuda requested but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
