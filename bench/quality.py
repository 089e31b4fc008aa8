"""Quality benchmark: what the pipeline registers, against what is cheap, on packaged data.

For each case, the whole pipeline (the Python door, default params.yaml plus the case's
overrides) in its own folder under ``--out``; then, from its report: the registered model's
test accuracy (marked "classical" when fine-tuning did not beat the classical model on val,
"probe" when no epoch beat the exact probe beyond val noise), the transfer role's mean over
seeds with its 95% t-interval and how many seeds ended at the exact probe, the probe arm,
transfer − probe (paired over test examples, and each seed's), the classical baseline
(logistic regression on pixels / TF-IDF), the from-scratch baseline, the verdict, the
promotion decision, and the wall and CPU seconds of every step. This is how a change is known
to help: run it before and after.

    .venv/bin/python bench/quality.py [--cases digits-k20-32,digits-k20-auto] [--quick]
        [--set compute.n_workers=2 ...]

``--quick``: 4 search trials and 2 seeds (a smoke run, not for RESULTS.md). ``--set``: params
for every case (a value is read as YAML). ``--help`` lists the cases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

os.environ.setdefault("TRANSFEROPS_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transferops.config import load_config
from transferops.pipeline.run import StepFn, StepKey, run_pipeline
from transferops.runtime.artifacts import read_json

ROOT = Path(__file__).resolve().parents[1]
TEXT = {
    "data.demo": "fortunes",
    "data.format": "table",
    "data.path": "data/raw/fortunes.csv",
    "source.kind": "hf",
    "source.name": "sentence-transformers/all-MiniLM-L6-v2",
    "source.weights": None,
}
CASES: dict[str, dict[str, Any]] = {
    "digits-k20-32": {"data.limit_per_class": 20, "data.image.size": 32},  # the old demo
    "digits-k20-auto": {"data.limit_per_class": 20},  # the demo (auto: 64 px)
    "digits-k10-auto": {"data.limit_per_class": 10},
    "digits-all-auto": {"data.limit_per_class": None},
    "fortunes-k10": TEXT | {"data.limit_per_class": 10},
    "fortunes-k40": TEXT | {"data.limit_per_class": 40},
}
LFW = {"data.demo": None, "data.path": "data/raw/lfw"}
CASES |= {  # real photos where ImageNet features should help (needs `pip install .[bench]`)
    "lfw-faces-k20": LFW | {"data.limit_per_class": 20},
    "lfw-faces-all": LFW | {"data.limit_per_class": None},
}
FOLDER = {"data.demo": None, "data.path": "data/raw/folder"}
CASES |= {  # the shape: a 1,300-image, 9-class, 64-px PNG folder, default params
    "folder-9x1300": FOLDER,
    "folder-9x1300-all": FOLDER | {"data.limit_per_class": None},
}
CLIPART = {"data.demo": None, "data.path": "data/raw/clipart"}
CLIPART_DIR = Path("/usr/share/openclipart/png")  # Debian's openclipart-png
CLIPART_CATEGORIES = (
    "animals",
    "buildings",
    "food",
    "geography",
    "office",
    "people",
    "plants",
    "recreation",
    "tools",
    "transportation",
)
CASES |= {  # drawn images, 10 categories, not digits or faces (apt-get install openclipart-png)
    "clipart-10-k20": CLIPART | {"data.limit_per_class": 20},
    "clipart-10-all": CLIPART | {"data.limit_per_class": None},
}
CLIPART_FINE = {"data.demo": None, "data.path": "data/raw/clipart-fine"}
CLIPART_FINE_CATEGORIES = (  # sub-categories of >= 50 drawings, fixed before its first run
    "animals/mammals",
    "animals/birds",
    "animals/bugs",
    "food/fruit",
    "food/desserts",
    "food/beverages",
    "recreation/music",
    "recreation/sports",
    "recreation/party",
    "transportation/vehicles",
)
CASES |= {  # held out: finer classes of the same clip art (birds vs bugs, fruit vs desserts)
    "clipart-fine-10-k20": CLIPART_FINE | {"data.limit_per_class": 20},
}
DEBIAN = TEXT | {  # a table with its own column names, read through data.table
    "data.demo": None,
    "data.path": "data/raw/debian-packages.csv",
    "data.table.text_column": "description",
    "data.table.label_column": "section",
}
DEBIAN_LISTS = Path("/var/lib/apt/lists")  # apt's package index (lz4, after `apt-get update`)
DEBIAN_SECTIONS = (
    "database",
    "editors",
    "fonts",
    "games",
    "graphics",
    "mail",
    "net",
    "science",
    "sound",
    "video",
)
DEBIAN_B = DEBIAN | {"data.path": "data/raw/debian-packages-b.csv"}
DEBIAN_SECTIONS_B = (  # a second draw of sections, fixed before its first run
    "admin",
    "doc",
    "electronics",
    "gnome",
    "interpreters",
    "kde",
    "math",
    "text",
    "web",
    "x11",
)
DEBIAN_C = DEBIAN | {"data.path": "data/raw/debian-packages-c.csv"}
DEBIAN_SECTIONS_C = (  # a third draw, fixed before block_lr_scale was tuned on A, B, fortunes
    "comm",
    "devel",
    "hamradio",
    "httpd",
    "java",
    "localization",
    "otherosfs",
    "tex",
    "utils",
    "vcs",
)
CASES |= {  # text nobody on the project tuned on: a package's description -> its section
    "debian-10-k40": DEBIAN | {"data.limit_per_class": 40},
    "debian-b-10-k40": DEBIAN_B | {"data.limit_per_class": 40},
    "debian-c-10-k40": DEBIAN_C | {"data.limit_per_class": 40},
}
MANPAGES = DEBIAN | {"data.path": "data/raw/manpages.csv", "data.table.text_column": "text"}
MAN_SECTIONS = ("1", "2", "3", "5", "7", "8")  # commands, syscalls, library, files, misc, admin
CASES |= {  # long texts (median ~200 tokens): fixed before its first run, for max_length
    "manpages-6-k40": MANPAGES | {"data.limit_per_class": 40},
}
QUICK = {"search.n_trials": 4, "baseline.seeds": [0, 1]}


def write_folder(folder: Path, n: int = 1300, size: int = 64) -> None:
    """The packaged digits 1-9 as a plain image folder of `n` `size`-px PNGs (no split
    folders: prepare splits them), the shape of a user's own small photo folder."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(digits.target > 0)[:n]
    for i in keep:
        cls = folder / str(digits.target[i])
        cls.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((digits.images[i] * 16).clip(0, 255).astype("uint8"))
        img.resize((size, size), Image.Resampling.BICUBIC).save(cls / f"{i:04d}.png")


def write_lfw(folder: Path) -> None:
    """scikit-image's subset of Labeled Faces in the Wild (in its wheel, `skimage.data.
    lfw_subset`): 100 face crops then 100 non-face patches of the same photos, 25x25 grey,
    written as an image folder with classes face / not-face."""
    from PIL import Image
    from skimage import data

    images = data.lfw_subset()
    for i, img in enumerate(images):
        cls = folder / ("face" if i < 100 else "not-face")
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).round().astype("uint8")).save(cls / f"{i:03d}.png")


def write_clipart(folder: Path, categories: tuple[str, ...] = CLIPART_CATEGORIES) -> dict[str, int]:
    """Debian's clip art as an image folder, one class per category (a top category or a
    sub-category path, its last part naming the class folder), each drawing once:
    symlinks skipped and copies found by content (a 12 x 12 grey thumbnail on white, so the
    ``_01`` / ``_02`` size variants of one drawing count once), so that no drawing can land in
    both train and test. Returns the images per class."""
    import numpy as np
    from PIL import Image

    seen: set[bytes] = set()
    kept: dict[str, int] = {}
    for cat in categories:
        dest = folder / Path(cat).name
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((CLIPART_DIR / cat).rglob("*.png")):
            if src.is_symlink():
                continue
            try:
                with Image.open(src) as im:
                    if im.size[0] * im.size[1] > 20_000_000:  # a poster-sized scan: not a sample
                        continue
                    rgba = im.convert("RGBA")
            except (OSError, Image.DecompressionBombError):
                continue
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            thumb = Image.alpha_composite(white, rgba).convert("L").resize((12, 12))
            key = (np.asarray(thumb) // 32).tobytes()  # 8 grey levels: survives resampling
            if key in seen:
                continue
            seen.add(key)
            shutil.copy(src, dest / f"{len(seen):05d}_{src.name}")
            kept[dest.name] = kept.get(dest.name, 0) + 1
    return kept


def _sample_table(
    path: Path, header: list[str], rows: dict[str, list[str]], per_label: int, label: str = "{}"
) -> dict[str, int]:
    """A CSV of (text, label) with at most `per_label` texts a label, drawn with seed 0 in
    the order of `rows`; the rows written per label."""
    import csv
    import random

    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for key, texts in rows.items():
            for text in rng.sample(texts, min(per_label, len(texts))):
                w.writerow([text, label.format(key)])
    return {k: min(per_label, len(t)) for k, t in rows.items()}


def write_debian(
    path: Path, sections: tuple[str, ...] = DEBIAN_SECTIONS, per_section: int = 170
) -> dict[str, int]:
    """Debian's package index as a text table: a package's description (its summary line,
    and the first paragraph of its long description where the index has it: the main
    index has only the summary) and its section, for `sections`; each description once
    (``-dev`` / ``-doc`` siblings often share one), at most `per_section` per section,
    drawn with a fixed seed. The rows are those of the index `apt-get update` last fetched:
    another day's index gives another draw. Returns the rows per section."""
    import subprocess

    found = sorted(DEBIAN_LISTS.glob("*_main_binary-amd64_Packages.lz4"))
    if not found:
        raise SystemExit(f"no Debian package index in {DEBIAN_LISTS}: run `apt-get update`")
    index = found[-1]
    raw = subprocess.run(["lz4", "-dc", str(index)], capture_output=True, check=True).stdout
    rows: dict[str, list[str]] = {s: [] for s in sections}
    seen: set[str] = set()
    for stanza in raw.decode("utf-8", "replace").split("\n\n"):
        fields, desc, key = {}, [], ""
        for line in stanza.splitlines():
            if line.startswith(" "):  # a continuation of `key` (Tag's debtags name the section)
                if key == "Description" and line.strip() == ".":
                    key = ""  # the first paragraph only
                elif key == "Description":
                    desc.append(line.strip())
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        section = fields.get("Section", "").split("/")[-1]
        text = " ".join([fields.get("Description", ""), *desc]).strip()
        if section in rows and text and text not in seen:
            seen.add(text)
            rows[section].append(text)
    return _sample_table(path, ["description", "section"], rows, per_section)


# font changes (\fB, \f(CW, \f[I]), strings (\*(xx, \*x), special characters (\(xx),
# sizes (\s-1), thin spaces and zero-width and escape characters (\|, \^, \&, \e)
ROFF_ESCAPES = (
    r"\\f(\(..|\[[^\]]*\]|.)|\\\*(\(..|\[[^\]]*\]|.)|\\\(..|\\\[[^\]]*\]"
    r"|\\s[-+]?\d|\\[|^&e]"
)


def _roff_text(source: str, words: int) -> str:
    """A man page's NAME line and the first `words` words of its DESCRIPTION, as plain text
    (macro lines dropped, font escapes removed)."""
    import re

    section, name, desc = "", [], []
    for line in source.splitlines():
        if line.startswith((".SH", ".Sh")):
            section = line[3:].strip().strip('"').upper()
            continue
        if line.startswith((".", "'")) or section not in ("NAME", "DESCRIPTION"):
            continue
        text = re.sub(ROFF_ESCAPES, "", line.replace("\\-", "-").replace("\\ ", " "))
        text = text.strip()
        (name if section == "NAME" else desc).append(text)
    body = " ".join(" ".join(desc).split()[:words])
    return f"{' '.join(name)}. {body}".strip() if desc else ""


def write_manpages(path: Path, per_section: int = 170, words: int = 150) -> dict[str, int]:
    """The man pages installed on this machine as a text table: a page's NAME line and the
    start of its DESCRIPTION -> its section (MAN_SECTIONS), each text once, at most
    `per_section` a section drawn with a fixed seed. Another machine's pages give another
    draw. Returns the rows per section."""
    import gzip

    rows: dict[str, list[str]] = {s: [] for s in MAN_SECTIONS}
    seen: set[str] = set()
    for s in MAN_SECTIONS:
        for page in sorted(Path(f"/usr/share/man/man{s}").glob("*.gz")):
            if page.is_symlink():
                continue
            try:
                with gzip.open(page, "rt", errors="replace") as f:
                    text = _roff_text(f.read(), words)
            except (OSError, EOFError):
                continue
            if len(text.split()) >= 20 and text not in seen and not text.startswith(".so"):
                seen.add(text)
                rows[s].append(text)
    return _sample_table(path, ["text", "section"], rows, per_section, label="man{}")


def write_case_data(folder: Path, overrides: dict[str, Any]) -> None:
    """The case's data set written into its project folder (the demo sets need nothing)."""
    writers = {
        LFW["data.path"]: write_lfw,
        FOLDER["data.path"]: write_folder,
        CLIPART["data.path"]: write_clipart,
        CLIPART_FINE["data.path"]: lambda path: write_clipart(path, CLIPART_FINE_CATEGORIES),
        DEBIAN["data.path"]: write_debian,
        DEBIAN_B["data.path"]: lambda path: write_debian(path, DEBIAN_SECTIONS_B),
        DEBIAN_C["data.path"]: lambda path: write_debian(path, DEBIAN_SECTIONS_C),
        MANPAGES["data.path"]: write_manpages,
    }
    writer = writers.get(overrides.get("data.path"))
    if writer is not None:
        writer(folder / overrides["data.path"])


def _timed_runner(times: dict[str, tuple[float, float]]):
    def run(step: str, key: StepKey | None, fn: StepFn) -> dict[str, Any]:
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn()
        finally:
            times[step] = (time.perf_counter() - w, time.process_time() - c)

    return run


@contextlib.contextmanager
def in_case_folder(out: Path, name: str, overrides: dict[str, Any]) -> Iterator[Path]:
    """A fresh project folder ``out/<name>`` (params.yaml + the case's data), the working
    directory while inside: every output path in params.yaml is relative to it."""
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", folder / "params.yaml")
    write_case_data(folder, overrides)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)


def run_case(name: str, overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    """The pipeline on one case in ``out/<name>``; its figures."""
    with in_case_folder(out, name, overrides) as folder:
        cfg = load_config(Path("params.yaml"), overrides)  # a preset in --set applies
        times: dict[str, tuple[float, float]] = {}
        summary = run_pipeline(cfg, _timed_runner(times))
        metrics = read_json(Path(cfg.evaluate.out) / "metrics.json")
        manifest = read_json(Path(cfg.data.out) / "manifest.json")
    m = metrics["models"]
    return {
        "case": name,
        "train": sum(manifest["counts"]["train"].values()),  # counts are per class
        "size": manifest.get("image_size"),
        "registered": metrics["finetuned"]["accuracy"],
        "candidate": metrics["finetuned"].get("candidate", "finetuned"),
        "transfer": m["transfer"]["accuracy"],
        "at_probe": m["transfer"].get("at_probe", 0),
        "minus_probe": metrics.get("transfer_minus_probe", {}).get("accuracy"),
        "probe": m.get("probe", {}).get("accuracy"),
        "classical": m.get("classical", {}).get("accuracy"),
        "scratch": m["scratch"]["accuracy"],
        "verdict": metrics["verdict"],
        "calibration": metrics["finetuned"].get("calibration"),
        "min_recall": metrics["finetuned"].get("min_class_recall"),
        "evaluated": read_json(Path(folder) / cfg.search.out / "summary.json").get(
            "fully_evaluated"
        ),
        "promoted": summary.get("champion") is not None
        and summary.get("registered", "").endswith(f"v{summary.get('champion')}"),
        "times": times,
    }


def _ci(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    if m.get("ci_low") is None:
        return f"{m['mean']:.3f}"
    return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def _diff(d: dict[str, Any] | None) -> str:
    """transfer - probe in points: the paired bootstrap over test examples; each seed's."""
    if d is None:
        return "-"
    each = ", ".join(f"{100 * x:+.1f}" for x in d["over_seeds"].get("per_seed", []))
    return f"{100 * d['mean']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]; {each}"


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _cal(c: dict[str, float] | None) -> str:
    if not c:
        return "-"
    return (
        f"{c['test_nll_before']:.3f} / {c['test_ece_before']:.3f} -> {c['test_nll_after']:.3f}"
        f" / {c['test_ece_after']:.3f} ({c['temperature']:.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__ + "\ncases:\n" + "\n".join(f"  {k}: {v}" for k, v in CASES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/transferops-quality"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (" (quick)" if args.quick else "")
        + "".join(f", {k}={v}" for k, v in extra.items())
    )
    print(
        "| case | train / px | registered | transfer (95% CI over seeds; seeds at the probe) | "
        "probe | transfer - probe (paired; per seed) | classical | scratch | verdict | "
        "promoted | min class recall | configs fully "
        "evaluated | test NLL / ECE before -> after calibration (T) | seconds wall / cpu "
        "per step |"
    )
    print("| --- " * 14 + "|")
    for name in args.cases.split(","):
        r = run_case(name, CASES[name] | (QUICK if args.quick else {}) | extra, args.out)
        steps = ", ".join(f"{s} {w:.0f}/{c:.0f}" for s, (w, c) in r["times"].items() if w >= 1)
        total_w = sum(w for w, _ in r["times"].values())
        total_c = sum(c for _, c in r["times"].values())
        kind = "" if r["candidate"] == "finetuned" else f" ({r['candidate']})"
        print(
            f"| {name} | {r['train']} / {r['size'] or '-'} | {r['registered']:.3f}"
            f"{kind} | "
            f"{_ci(r['transfer'])}; {r['at_probe']} | {_ci(r['probe'])} | "
            f"{_diff(r['minus_probe'])} | "
            f"{r['classical']:.3f} | {_ci(r['scratch'])} | {r['verdict']} | "
            f"{'yes' if r['promoted'] else 'no'} | {_opt(r['min_recall'])} | "
            f"{r['evaluated'] if r['evaluated'] is not None else '-'} | {_cal(r['calibration'])} "
            f"| {steps}; total {total_w:.0f}/{total_c:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
