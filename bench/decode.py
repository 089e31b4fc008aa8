"""Decoding photos: the JPEG decoder's own reduced scale (``draft``) against a full decode.

`prepare` (and `predict`, and the served model) decode every image once to
``data.image.size``. A phone photo is 12 MP or more, 20-50x the side kept; since this change
`decode_image` lets libjpeg scale by 1/2..1/8 in the DCT, never below the side kept. This
prints, side by side in one run, per side kept: CPU and wall seconds an image for the full
decode (Pillow's antialiased resize of every pixel: what `decode_image` did before) and for
`decode_image`, and how far apart their pixels are (mean and max absolute difference, grey
levels of 255).

The photos are scikit-learn's two sample photos (china.jpg, flower.jpg: real photos, 640 x
427) cropped and enlarged to 4032 x 3024 and saved as JPEG at quality 90: a 12-MP file with
a photo's structure, not a real 12-MP sensor's detail.

    .venv/bin/python bench/decode.py [--photos 20] [--sides 64,128,224]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image

from transferops.model.inputs import decode_image


def write_photos(folder: Path, n: int) -> list[Path]:
    """`n` 12-MP JPEGs made from the two sample photos (random crops, enlarged)."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(load_sample_image(f)) for f in ("china.jpg", "flower.jpg")]
    paths = []
    for i in range(n):
        im = photos[i % 2]
        w, h = im.size
        x, y = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        crop = im.crop((x, y, x + 3 * w // 4, y + 3 * h // 4)).resize((4032, 3024))
        paths.append(folder / f"photo{i:03d}.jpg")
        crop.save(paths[-1], quality=90)
    return paths


def full_decode(path: Path, side: int) -> np.ndarray:
    """What decode_image did before: every pixel decoded, then the antialiased fit."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return np.asarray(ImageOps.fit(im, (side, side), Image.Resampling.BILINEAR))


def timed(fn, paths: list[Path], side: int) -> tuple[list[np.ndarray], float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = [fn(p, side) for p in paths]
    n = len(paths)
    return out, (time.process_time() - c0) / n, (time.perf_counter() - w0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--photos", type=int, default=20)
    ap.add_argument("--sides", default="64,128,224")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.photos)
        print(f"{args.photos} JPEGs of 4032 x 3024, quality 90")
        print(
            "| side | full decode CPU / wall ms | decode_image CPU / wall ms | speed-up (CPU) "
            "| mean / max abs diff |"
        )
        print("| --- | --- | --- | --- | --- |")
        for side in (int(s) for s in args.sides.split(",")):
            ref, rc, rw = timed(full_decode, paths, side)
            new, nc, nw = timed(lambda p, s: decode_image(p, s, "crop"), paths, side)
            d = np.abs(np.stack(ref).astype(int) - np.stack(new))
            print(
                f"| {side} | {1000 * rc:.0f} / {1000 * rw:.0f} | {1000 * nc:.0f} / "
                f"{1000 * nw:.0f} | {rc / nc:.1f}x | {d.mean():.2f} / {d.max()} |"
            )


if __name__ == "__main__":
    main()
