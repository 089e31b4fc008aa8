"""``source.kind: torchvision``: a torchvision classification model and its weights enum.

Where the weights come from: the torch hub cache (``$TORCH_HOME/hub/checkpoints``) first,
then the real download (torchvision's own path); ``weights: null`` is a random init. The
normalisation is the one the weights' transforms declare.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from transferops.config import SourceConfig
from transferops.errors import SourceError
from transferops.model.families import IMAGENET, build_architecture
from transferops.sources.local import image_source
from transferops.sources.manifest import Pulled


def resolve(cfg: SourceConfig) -> Any | None:
    """The torchvision weights enum entry named by ``source.weights`` (None: random init)."""
    import torchvision

    if cfg.weights is None:
        return None
    try:
        enum = torchvision.models.get_model_weights(cfg.name)
        return enum[cfg.weights] if cfg.weights != "DEFAULT" else enum.DEFAULT
    except (ValueError, KeyError):
        raise SourceError(
            f"source.weights: {cfg.weights!r} is not a weights name of torchvision {cfg.name!r}"
        ) from None


def load(cfg: SourceConfig, workdir: Path) -> Pulled:
    """The architecture with its weights from the hub cache (or the hub)."""
    model, fam = build_architecture("torchvision", cfg.name)
    weights = resolve(cfg)
    if weights is None:
        return image_source(
            cfg, model, fam, None, f"torchvision:{cfg.name} (random init)", IMAGENET
        )
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        sd = torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, weights_only=True
        )
    except Exception as exc:
        raise SourceError(
            f"torchvision weights {cfg.name}/{weights.name} are not in the torch hub cache "
            f"({cache}) and could not be downloaded from {weights.url} ({type(exc).__name__}: "
            f"{exc}). Offline: copy that file to {cache} (or set TORCH_HOME), or use "
            "source.kind: local with source.path."
        ) from None
    meta = weights.transforms()
    norm = {"mean": list(meta.mean), "std": list(meta.std)}
    return image_source(cfg, model, fam, sd, f"torchvision:{cfg.name}/{weights.name}", norm)
