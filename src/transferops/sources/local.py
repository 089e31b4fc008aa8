"""``source.kind: local``: a weights file on disk plus the architecture it belongs to
(``source.name: torchvision:resnet18`` or ``efficientnet-lite0``).

Nothing is unpickled: ``.safetensors``, or ``torch.load(weights_only=True)`` for .pt/.pth,
which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from transferops.config import SourceConfig
from transferops.errors import SourceError
from transferops.model.families import build_architecture, family
from transferops.sources.manifest import Pulled, torch_weights


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors / .pt / .pth file, never unpickling code."""
    if not path.exists():
        raise SourceError(f"weights file {path} does not exist (source.path / source.weights)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(_refusal(path, exc)) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise SourceError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def _refusal(path: Path, exc: Exception) -> str:
    """Why a weights file was refused, without PyTorch's advice to load it unsafely."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found is None:
        return (
            f"{path}: refused: not a file of plain tensors ({type(exc).__name__}); give a state "
            "dict saved as .safetensors or with torch.save(model.state_dict(), ...)"
        )
    return (
        f"{path}: refused: it holds a pickled Python object ({found.group(1)}), not plain "
        "tensors. Loading it would let the file run code, so transferops never does (it loads "
        "with weights_only=True). Where the file comes from, save only the weights "
        "(torch.save(model.state_dict(), ...) or safetensors) and point source.path at that."
    )


def image_source(
    cfg: SourceConfig,
    model: nn.Module,
    fam: str,
    sd: dict[str, torch.Tensor] | None,
    origin: str,
    norm: dict,
) -> Pulled:
    """An image architecture with its weights loaded (`sd` None: random init)."""
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise SourceError(f"{origin}: weights do not fit {cfg.name}: {exc}") from None
    if cfg.blocks is None and family(fam).split is None:
        raise SourceError(
            f"source.name: no block discovery for {cfg.name!r}; give source.blocks (module names "
            "per block, input -> output)"
        )
    image_input = {"type": "image", **norm}
    return Pulled(
        cfg.kind, cfg.name, model, fam, origin, image_input, torch_weights(model), cfg.blocks
    )


def load(cfg: SourceConfig, workdir: Path) -> Pulled:
    """The file at ``source.path`` in the architecture ``source.name``."""
    if cfg.path is None:
        raise SourceError("source.path: kind local needs the weights file path")
    model, fam = build_architecture("local", cfg.name)
    sd = load_weights_file(Path(cfg.path))
    norm = family(fam).norm or {}
    return image_source(cfg, model, fam, sd, f"file:{cfg.path}", norm)
