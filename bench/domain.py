"""Domain shift: how much of the accuracy lost on a new domain each adaptation method wins back.

Each case is a labelled source domain and a target domain with the same classes. The model is
trained on the source (default params, `transferops train`; the classical candidate off, so
there is a network to adapt), then adapted (`transferops adapt`) with each method set, using
the target's unlabelled images only; the target's labelled sample scores it.

- ``digits-fonts``: the scanned digits (sklearn, 20 per class) -> the same digits rendered from
  the TrueType fonts matplotlib's wheel ships (DejaVu, STIX, Computer Modern: 21 faces), jittered
  (size, rotation, shift) and reduced to the scans' 8x8 grey grid.
- ``clipart-corrupt``: clip-art, 10 categories (Debian's openclipart-png, 20 per class) ->
  other drawings of the same categories, blurred, noised and faded (the imagecorruptions
  families: gaussian blur, gaussian noise, contrast).
- ``digits-corrupt``: the scanned digits -> held-out scans, blurred and noised.

Printed per case and method set: in-domain test accuracy, target accuracy before / after with
the paired 95% interval, the share of the domain gap recovered, the ATC proxy of target
accuracy (from the unlabelled images) before / after, source val before / after, the domain
classifier AUC after, CPU seconds of the adaptation.

    .venv/bin/python bench/domain.py [--cases digits-fonts,clipart-corrupt] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import in_case_folder, write_clipart

from transferops.adapt.adapt import adapt
from transferops.config import load_config
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.evaluation.evaluate import predict
from transferops.finetune.train import train_from_config
from transferops.model.inputs import pick_device
from transferops.sources.pull import pull_from_config

METHOD_SETS = [
    ["adabn"],
    ["coral"],
    ["weights"],
    ["pseudo_label"],
    ["adabn", "pseudo_label"],
    ["adabn", "coral"],
    ["adabn", "coral", "pseudo_label"],
    ["align"],
    ["adabn", "align"],
    ["adabn", "align", "pseudo_label"],
]


def _digit_png(arr8: np.ndarray, path: Path) -> None:
    """An 8x8 image in sklearn's 0..16 ink scale, written like bench/quality.py's folder."""
    img = Image.fromarray((arr8 * 16).clip(0, 255).astype("uint8"))
    img.resize((64, 64), Image.Resampling.BICUBIC).save(path)


def write_digit_scans(root: Path, keep: np.ndarray) -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in keep:
        cls = root / str(d.target[i])
        cls.mkdir(parents=True, exist_ok=True)
        _digit_png(d.images[i], cls / f"{i:04d}.png")


def fonts() -> list[Path]:
    import matplotlib

    ttf = Path(matplotlib.__file__).parent / "mpl-data/fonts/ttf"
    skip = (
        "cmex",
        "cmsy",
        "cmmi",
        "LastResort",
        "SizFive",
        "SizFour",
        "SizOne",
        "SizThree",
        "SizTwo",
        "NonUni",
    )
    return sorted(p for p in ttf.glob("*.ttf") if not any(s in p.name for s in skip))


def render_digit(font: Path, digit: int, rng: np.random.Generator) -> np.ndarray | None:
    """A digit as the scans were made (UCI optdigits): drawn in `font` (jittered size, slant,
    stroke), thresholded to a bitmap, its ink box scaled to 32 px high, then 4x4 blocks
    counted into 8x8 values of 0..16. None if the font has no ink for it."""
    canvas = Image.new("L", (96, 96), 0)
    f = ImageFont.truetype(str(font), int(rng.integers(48, 64)))
    draw = ImageDraw.Draw(canvas)
    draw.text((20, 10), str(digit), fill=255, font=f, stroke_width=int(rng.integers(0, 3)))
    canvas = canvas.rotate(float(rng.normal(0, 6)), resample=Image.Resampling.BILINEAR)
    ink = np.asarray(canvas) > 127
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if len(rows) < 4 or len(cols) < 2:
        return None
    box = Image.fromarray(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype("uint8") * 255)
    h, w = box.size[1], box.size[0]
    scale = 32 / max(h, w)
    box = box.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
    )
    bitmap = Image.new("L", (32, 32), 0)
    bitmap.paste(box, ((32 - box.size[0]) // 2, (32 - box.size[1]) // 2))
    bits = np.asarray(bitmap) > 127
    return bits.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(float)


def write_font_digits(
    root: Path, per_class: int, seed: int, labelled: bool, bold: bool | None = False
) -> None:
    """Font digits; `bold`: only the bold faces (the auxiliary domain), False: the others,
    None: all."""
    rng = np.random.default_rng(seed)
    faces = [f for f in fonts() if bold is None or ("Bol" in f.stem or f.stem == "cmb10") == bold]
    for digit in range(10):
        folder = root / str(digit) if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        j = 0
        while j < per_class:
            font = faces[int(rng.integers(len(faces)))]
            arr = render_digit(font, digit, rng)
            if arr is None:
                continue
            _digit_png(arr, folder / f"{digit}_{j:03d}_{font.stem}.png")
            j += 1


def corrupt(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur + gaussian noise + low contrast (imagecorruptions' families, severity ~3)."""
    img = img.convert("RGB").filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 2.0))))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.4, 0.6)))
    arr = np.asarray(img, dtype=float) + rng.normal(0, 20, (img.size[1], img.size[0], 3))
    return Image.fromarray(arr.clip(0, 255).astype("uint8"))


def write_corrupted(
    pool: list[tuple[str, Path]], unl: Path, tt: Path, seed: int, size: int
) -> None:
    """Corrupted copies of `pool` (label, file): two thirds unlabelled, a third labelled."""
    rng = np.random.default_rng(seed)
    for i, (label, src) in enumerate(pool):
        with Image.open(src) as im:
            if im.mode in ("RGBA", "LA", "P"):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            # at the size the model sees: a blur or noise on a 600-px drawing vanishes when
            # prepare scales it down
            im = ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
            out = corrupt(im, rng)
        if i % 3 == 2:
            (tt / label).mkdir(parents=True, exist_ok=True)
            out.save(tt / label / f"{i:05d}.png")
        else:
            unl.mkdir(parents=True, exist_ok=True)
            out.save(unl / f"{i:05d}.png")


def write_blurred(src: Path, aux: Path, per_class: int) -> None:
    """A related labelled domain: `per_class` source images per class, blurred only."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (aux / cls.name).mkdir(parents=True, exist_ok=True)
        for p in sorted(cls.glob("*.png"))[-per_class:]:
            with Image.open(p) as im:
                im.convert("RGB").filter(ImageFilter.GaussianBlur(2.0)).save(
                    aux / cls.name / p.name
                )


def write_case(case: str, folder: Path) -> dict:
    """The case's source data, unlabelled target and labelled target sample; its overrides."""
    src, unl, tt = folder / "data/source", folder / "data/unlabelled", folder / "data/target_test"
    aux = folder / "data/auxiliary"
    if case == "digits-fonts":
        write_digit_scans(src, np.arange(1797))
        write_font_digits(unl, 60, seed=1, labelled=False)
        write_font_digits(tt, 30, seed=2, labelled=True)
        write_font_digits(aux, 20, seed=5, labelled=True, bold=True)  # related: bold faces
    elif case == "digits-corrupt":
        idx = np.random.default_rng(0).permutation(1797)
        write_digit_scans(src, idx[:1200])
        held = folder / "held"
        write_digit_scans(held, idx[1200:])
        pool = [(p.parent.name, p) for p in sorted(held.rglob("*.png"))]
        write_corrupted(pool, unl, tt, seed=3, size=64)
        write_blurred(src, aux, per_class=20)  # related: blurred (not noised, not faded)
    elif case == "clipart-corrupt":
        every = folder / "all"
        write_clipart(every)
        pool, mine = [], []
        for p in sorted(every.rglob("*.png")):
            h = int(hashlib.sha256(p.name.encode()).hexdigest()[:8], 16)
            (pool if h % 10 < 3 else mine).append(p)
        for p in mine:
            (src / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), src / p.parent.name / p.name)
        write_corrupted([(p.parent.name, p) for p in pool], unl, tt, seed=4, size=128)
    else:
        raise SystemExit(f"unknown case {case}")
    return {
        "data.demo": None,
        "data.path": str(src.relative_to(folder)),
        "data.unlabelled": str(unl.relative_to(folder)),
        "data.target_test": str(tt.relative_to(folder)),
        "data.limit_per_class": 20,
        "registry.classical_candidate": False,
        "source.candidates": None,
    }


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    ap.add_argument("--cases", default="digits-fonts,clipart-corrupt,digits-corrupt")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-domain"))
    ap.add_argument("--methods", help="method sets to run, e.g. adabn+pseudo_label,coral")
    ap.add_argument("--no-auxiliary", action="store_true", help="skip the auxiliary rows")
    args = ap.parse_args()
    sets = [m.split("+") for m in args.methods.split(",")] if args.methods else METHOD_SETS
    print(
        "| case | seed | methods | in-domain test | target before | target after | after - before "
        "(95% CI) | gap recovered | ATC proxy before -> after | source val before -> after "
        "| domain AUC after | CPU s |"
    )
    print("| --- " * 12 + "|")
    for case in args.cases.split(","):
        with in_case_folder(args.out, case, {}) as folder:  # its data: write_case below
            # one network per training seed: the methods' figures in RESULTS.md are of one
            # (with the default ensemble, adapt adapts its first member)
            overrides = write_case(case, folder) | {"finetune.ensemble": 1}
            for seed in [int(s) for s in args.seeds.split(",")]:
                cfg = load_config(Path("params.yaml"), overrides | {"finetune.seed": seed})
                prepare(cfg)
                pull_from_config(cfg)
                train_from_config(cfg)
                test = load_prepared(cfg.data.out, "test")
                probs = predict(Path(cfg.finetune.out), test, pick_device("cpu"))
                home = float((probs.argmax(1) == test.labels.numpy()).mean())
                runs = [(m, {}) for m in sets]
                if (
                    folder / "data/auxiliary"
                ).exists() and not args.no_auxiliary:  # the related labelled domain too
                    aux = {"data.auxiliary": "data/auxiliary"}
                    runs += [(["weights"], aux), (["adabn", "pseudo_label"], aux)]
                for methods, extra in runs:
                    if extra:
                        prepare(load_config(Path("params.yaml"), overrides | extra))
                    r = adapt(
                        load_config(
                            Path("params.yaml"),
                            overrides | extra | {"finetune.seed": seed, "adapt.methods": methods},
                        )
                    )
                    t, d = r["target_accuracy"], r["target_minus_before"]
                    gap = home - t["before"]
                    rec = (t["after"] - t["before"]) / gap if gap > 0.01 else float("nan")
                    v, e = r["source_val_accuracy"], r["proxy_atc"]
                    print(
                        f"| {case} | {seed} | {'+'.join(methods)}{' + auxiliary' if extra else ''} "
                        f"| {home:.3f} | {t['before']:.3f} "
                        f"| {t['after']:.3f} | {100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, "
                        f"{100 * d['ci_high']:+.1f}] | {rec:.0%} "
                        f"| {e['before']:.3f} -> {e['after']:.3f} "
                        f"| {v['before']:.3f} -> "
                        f"{v['after']:.3f} | {r['proxy_domain_auc']['after']:.3f} "
                        f"| {r['seconds']['cpu']} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
