"""`prepare`: raw data -> fixed, hashed splits of uint8 tensors (images) or texts.

Images are decoded and resized once here; training never touches a JPEG. The output folder
(``data.out``) is written atomically with a ``manifest.json`` holding class names, counts
per split, the source files' content hash and the prepared artifacts' hash. The latter
(:func:`prepared_data_hash`) is what later stages record in MLflow. Re-running on unchanged
input and params does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save_file

from transferops.config import STEP_INPUTS, Config, DataConfig
from transferops.data.demo import write_demo
from transferops.data.domains import domains_hash, write_domains
from transferops.data.prepared import FORMAT_VERSION, MANIFEST
from transferops.data.readers import SPLITS, Example, RawDataset, SplitName, read_dataset
from transferops.errors import DataError
from transferops.model.inputs import decode_image
from transferops.runtime.artifacts import (
    atomic_dir,
    read_json,
    sha256_file,
    sha256_files,
    sha256_json,
)
from transferops.runtime.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class PrepareResult:
    """What `prepare` did."""

    out: Path
    data_hash: str
    skipped: bool  # True when the output was already up to date
    counts: dict[str, int]


# ---------------------------------------------------------------------- public


def prepare(cfg: Config | DataConfig, force: bool = False) -> PrepareResult:
    """Prepare the configured dataset into ``data.out`` (a no-op when already up to date)."""
    dcfg = cfg.data if isinstance(cfg, Config) else cfg
    if dcfg.demo and not Path(dcfg.path).exists():
        log.info("data.path %s missing: writing the built-in %r demo there", dcfg.path, dcfg.demo)
        write_demo(dcfg.demo, Path(dcfg.path))
    raw = read_dataset(dcfg)
    source_hash = sha256_files(raw.files, raw.root)
    fingerprint = sha256_json(
        {
            "version": FORMAT_VERSION,
            "source_hash": source_hash,
            "params": _prepare_params(dcfg),
            "domains": domains_hash(dcfg),  # data.unlabelled / data.target_test
        }
    )
    out = Path(dcfg.out)
    if not force and _up_to_date(out, fingerprint):
        manifest = read_json(out / MANIFEST)
        return _result(out, manifest, skipped=True)

    # said before the split's count check, which may stop here: both are then seen at once
    _warn_label_variants(Counter(e.label for e in raw.examples))
    assignment = assign_splits(raw, dcfg)  # validates counts before any decoding
    copies = _warn_copies(assignment, raw.root)
    if raw.modality == "image":
        dcfg = dcfg.model_copy(
            update={"image": dcfg.image.model_copy(update={"size": image_size(dcfg, raw)})}
        )
    class_names = sorted({e.label for exs in assignment.values() for e in exs})
    left_out = Counter(e.label for e in raw.examples if e.label not in class_names)
    class_index = {c: i for i, c in enumerate(class_names)}
    bad: list[str] = []
    with atomic_dir(out) as tmp:
        counts = _write_splits(assignment, raw.modality, dcfg, class_index, tmp, bad)
        _check_after_decoding(counts, class_names, bad)
        artifacts = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        # after the hash: new unlabelled data does not make the labelled data "changed"
        size = dcfg.image.size if raw.modality == "image" else 0
        domains = write_domains(dcfg, tmp, class_names, size) if size else {}
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "modality": raw.modality,
            "class_names": class_names,
            "counts": counts,
            "image_size": dcfg.image.size if raw.modality == "image" else None,
            "source": {
                "path": str(dcfg.path),
                "format": dcfg.format,
                "n_files": len(raw.files),
                "content_hash": source_hash,
                "given_splits": raw.has_given_splits and dcfg.splits.mode != "random",
            },
            "skipped_files": {"count": len(bad), "files": bad},
            "duplicates_across_splits": copies["across_splits"],
            "conflicting_labels": copies["conflicting_labels"],
            "left_out_classes": dict(sorted(left_out.items())),  # data.on_small_class: skip
            "ignored_files": len(raw.ignored),
            "params": _prepare_params(dcfg),
            "fingerprint": fingerprint,
            "artifacts": artifacts,
            "data_hash": sha256_json(artifacts),
            "domains": domains,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return _result(out, manifest, skipped=False)


# ------------------------------------------------------------------- internals


MAX_FILE_WARNINGS = 5  # per-file warnings printed; a count and the manifest say the rest
AUTO_IMAGE_MIN = 64  # px; below it a 32x-downsampling backbone ends on a 1x1 feature map
AUTO_SAMPLE = 500  # image headers read to pick the auto size


def _write_splits(
    assignment: dict[SplitName, list[Example]],
    modality: str,
    dcfg: DataConfig,
    class_index: dict[str, int],
    tmp: Path,
    bad: list[str],
) -> dict[str, dict[str, int]]:
    """Each split written into `tmp` (images decoded once into uint8 tensors, texts as
    JSONL); the examples kept per split and class (undecodable images go to `bad`)."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        exs = assignment[split]
        if modality == "image":
            kept, images = _decode_images(exs, dcfg, bad, split)
            tensors = {
                "images": images,
                "labels": torch.tensor([class_index[e.label] for e in kept], dtype=torch.int64),
            }
            save_file(tensors, str(tmp / f"{split}.safetensors"))
        else:
            kept = exs
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for e in kept:
                    f.write(json.dumps({"text": e.text, "label": class_index[e.label]}) + "\n")
        counts[split] = dict(sorted(Counter(e.label for e in kept).items()))
    return counts


def _warn_copies(assignment: dict[SplitName, list[Example]], root: Path) -> dict[str, int]:
    """Examples with the exact content (file bytes, or text) of another: a copy in train makes
    its twin in test an easy point, so test accuracy is optimistic; a copy under another class
    contradicts it (one of the two labels is wrong, or the classes overlap). One warning each,
    with examples and the count (also in the manifest); the data is left as it is."""
    first: dict[str, tuple[SplitName, Example]] = {}
    across: list[tuple[Example, Example]] = []
    conflicting: list[tuple[Example, Example]] = []
    for split in SPLITS:
        for e in assignment[split]:
            key = sha256_file(e.path) if e.path is not None else sha256_json(e.text)
            seen = first.setdefault(key, (split, e))
            if seen[0] != split:
                across.append((seen[1], e))
            if seen[1].label != e.label:
                conflicting.append((seen[1], e))

    def name(e: Example) -> str:
        if e.path is None:
            return repr((e.text or "")[:40])
        return str(e.path.relative_to(root)) if e.path.is_relative_to(root) else str(e.path)

    def shown(pairs: list[tuple[Example, Example]], labels: bool) -> str:
        def one(e: Example) -> str:
            return f"{name(e)} ({e.label})" if labels else name(e)

        return "; ".join(f"{one(a)} = {one(b)}" for a, b in pairs[:3]) + (
            "; ..." if len(pairs) > 3 else ""
        )

    if across:
        log.warning(
            "%d example(s) are exact copies of one in another split (%s): test accuracy is "
            "optimistic for them; remove the copies from the data",
            len(across),
            shown(across, False),
        )
    if conflicting:
        log.warning(
            "%d example(s) are exact copies of one labelled with another class (%s): the "
            "copies contradict each other; keep each under the one class it belongs to",
            len(conflicting),
            shown(conflicting, True),
        )
    return {"across_splits": len(across), "conflicting_labels": len(conflicting)}


def _warn_label_variants(counts: Counter[str]) -> None:
    """Labels that differ only in letter case or inner spaces ("Rust", "rust ", "RUST"): in
    a hand-kept table these are usually one class spelt two ways, which would split its
    examples into two classes that contradict each other. Named once; left as they are."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for label in counts:
        by_key[" ".join(label.casefold().split())].append(label)
    variants = [sorted(v) for v in by_key.values() if len(v) > 1]
    if variants:
        shown = "; ".join(" / ".join(f"{v!r} ({counts[v]})" for v in vs) for vs in variants[:5])
        log.warning(
            "%d label(s) are spelt more than one way, differing only in letter case or spaces "
            "(%s%s): each spelling is a class of its own; if they are one class, write them "
            "one way in the data",
            len(variants),
            shown,
            "; ..." if len(variants) > 5 else "",
        )


def _prepare_params(d: DataConfig) -> dict[str, Any]:
    """The params that change prepare's output (STEP_INPUTS["prepare"], as DVC lists them)."""
    keys = {k.removeprefix("data.") for k in STEP_INPUTS["prepare"].params}
    p = d.model_dump(mode="json", include=keys)
    if d.modality == "text":
        p.pop("image")
    return p


def _up_to_date(out: Path, fingerprint: str) -> bool:
    try:
        m = read_json(out / MANIFEST)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if m.get("fingerprint") != fingerprint:
        return False
    return all((out / name).exists() for name in m.get("artifacts", {}))


def _result(out: Path, manifest: dict[str, Any], skipped: bool) -> PrepareResult:
    """The outcome, logged as the one line `transferops prepare` shows."""
    totals = {s: sum(c.values()) for s, c in manifest["counts"].items()}
    counts = ", ".join(f"{k}={v}" for k, v in sorted(totals.items()))
    state = "up to date" if skipped else "written"
    log.info("%s: %s; %s; data hash %s", out, state, counts, manifest["data_hash"][:12])
    return PrepareResult(out, manifest["data_hash"], skipped, totals)


def assign_splits(raw: RawDataset, d: DataConfig) -> dict[SplitName, list[Example]]:
    """Deterministic stratified split (seeded), or the data's own splits when present.

    Within a class, examples are ordered by a seeded hash of their identity (the file's path
    under the data root, or the text), not by a shuffle of the list: when new examples
    arrive, existing ones keep their relative order, so the test split of the new data
    holds no example an earlier model trained on (unless a class more than doubles). That
    keeps a champion re-scored on the new test split honest.

    Raises DataError before any decoding when a class has too few examples.
    """
    sc = d.splits
    use_given = raw.has_given_splits and sc.mode != "random"
    if sc.mode == "given" and not raw.has_given_splits:
        raise DataError(
            "data.splits.mode is 'given' but the data has no split folders (train/ val/ test/) "
            "or split column; use mode: auto or random to split by data.splits.seed"
        )
    by_class: dict[str, list[Example]] = defaultdict(list)
    for e in raw.examples:
        by_class[e.label].append(e)
    # With given splits, a split the data lacks (e.g. no val/ folder) is carved from train.
    carve = {
        s: getattr(sc, s)
        for s in ("test", "val")  # test first: see the docstring
        if not use_given or not any(e.split == s for e in raw.examples)
    }
    out: dict[SplitName, list[Example]] = {"train": [], "val": [], "test": []}
    too_small: list[str] = []  # every such class, reported together
    for label in sorted(by_class):
        exs = by_class[label]
        pool = [e for e in exs if e.split == "train"] if use_given else exs
        pool = sorted(pool, key=lambda e: _split_key(e, raw.root, sc.seed))
        parts = _split_class(pool, carve)
        if parts is None:
            too_small.append(f"{label!r} ({len(pool)})")
            continue
        for s in SPLITS:
            if s == "train" or s in carve:
                out[s] += parts[s]
            else:
                out[s] += [e for e in exs if e.split == s]
    if too_small:
        splits = ["train", *sorted(carve, key=SPLITS.index)]
        why = (
            f"{len(too_small)} class(es) have too few examples in the "
            f"{'train split' if use_given else 'data'} to split into {'/'.join(splits)} (at "
            f"least {len(splits)}, one per split): {', '.join(too_small)}"
        )
        kept = {e.label for exs in out.values() for e in exs}
        if d.on_small_class == "fail" or len(kept) < 2:
            raise DataError(
                f"{why}. Add examples, remove these classes, provide split folders, or set "
                "data.on_small_class: skip to leave them out"
                + ("" if len(kept) >= 2 else f" (that would leave {len(kept)} class)")
                + "."
            )
        log.warning("%s: left out (data.on_small_class: skip); the model will not know them", why)
    if d.limit_per_class is not None:
        full = len(out["train"])
        out["train"] = _limit(out["train"], d.limit_per_class)
        if len(out["train"]) < full:
            log.warning(
                "data.limit_per_class=%d: training on %d of %d training examples (few-shot); "
                "set data.limit_per_class: null to use them all",
                d.limit_per_class,
                len(out["train"]),
                full,
            )
    return out


def _split_key(e: Example, root: Path, seed: int) -> str:
    """Where an example falls in its class's split order: a seeded hash of its identity."""
    if e.path is not None:
        p = Path(e.path)
        ident = (p.relative_to(root) if p.is_relative_to(root) else p).as_posix()
    else:
        ident = e.text or ""
    return hashlib.sha256(f"{seed}\0{ident}".encode()).hexdigest()


def _split_class(
    shuffled: list[Example], fractions: dict[str, float]
) -> dict[SplitName, list[Example]] | None:
    """Test first, then val, from the class's (hash-ordered) examples; the rest is train.
    None when the class is too small to give each split one example."""
    n = len(shuffled)
    need = {s: max(1, round(n * f)) for s, f in fractions.items()}
    if n - sum(need.values()) < 1:
        return None
    res: dict[SplitName, list[Example]] = {"train": [], "val": [], "test": []}
    start = 0
    for s, k in need.items():
        res[s] = shuffled[start : start + k]  # type: ignore[index]
        start += k
    res["train"] = shuffled[start:]
    return res


def _limit(train: list[Example], k: int) -> list[Example]:
    """First k per class in split order (already seeded-shuffled): a nested few-shot subset."""
    seen: Counter[str] = Counter()
    kept = []
    for e in train:
        if seen[e.label] < k:
            kept.append(e)
            seen[e.label] += 1
    return kept


def image_size(d: DataConfig, raw: RawDataset) -> int:
    """``data.image.size``, with ``auto`` resolved from the images' own sizes (headers only).

    ImageNet-style backbones downsample 32x, so below 64 px their last feature map is 1x1 and
    transfer suffers (digits, 8 px: exact probe 0.78 test at 32 px, 0.85 at 64); above the
    data's own resolution nothing is gained; `auto_max` bounds the CPU cost (it grows with the
    square of the size)."""
    paths = [e.path for e in raw.examples if e.path is not None]
    rng = random.Random(0)
    sample = rng.sample(paths, min(len(paths), AUTO_SAMPLE))
    sides = []
    for p in sample:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            continue  # reported once, when decoding
    median = int(np.median(sides)) if sides else AUTO_IMAGE_MIN
    if d.image.size != "auto":
        if d.image.size < median:
            log.warning(
                "data.image.size %d downsizes your images (median shorter side %d px): "
                "set data.image.size: auto (or %d) to keep their detail",
                d.image.size,
                median,
                median,
            )
        return d.image.size
    rounded = -(-median // 32) * 32
    chosen = min(max(AUTO_IMAGE_MIN, rounded), d.image.auto_max)
    why = f"median shorter side {median} px of {len(sides)} images; " + (
        f"raised to the {AUTO_IMAGE_MIN} px a 32x-downsampling backbone needs"
        if rounded < AUTO_IMAGE_MIN
        else "capped by data.image.auto_max (CPU cost grows with size squared)"
        if rounded > d.image.auto_max
        else "rounded up to a multiple of 32"
    )
    log.info("data.image.size: auto -> %d px (%s)", chosen, why)
    return chosen


def _decode_images(
    exs: list[Example], d: DataConfig, bad: list[str], split: str
) -> tuple[list[Example], torch.Tensor]:
    size = d.image.size
    kept, arrays = [], []
    for e in progress_bar(exs, f"decode {split}"):
        assert e.path is not None
        try:
            arr = decode_image(e.path, size, d.image.resize)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            why = _undecodable(exc)
            if d.on_bad_file == "fail":
                raise DataError(
                    f"{e.path}: {why}. Remove or fix the file, or set data.on_bad_file: skip."
                ) from None
            if len(bad) < MAX_FILE_WARNINGS:  # the first few; the manifest lists them all
                log.warning("skipping %s: %s", e.path, why)
            bad.append(str(e.path))
            continue
        kept.append(e)
        arrays.append(arr)
    if arrays:
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    else:
        images = torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return kept, images


def _undecodable(exc: Exception) -> str:
    """Why an image file was not decoded, in the user's terms."""
    if isinstance(exc, Image.DecompressionBombError):
        # Pillow refuses > 2x MAX_IMAGE_PIXELS (179 Mpx) by default: a guard against files
        # crafted to exhaust memory, which a scan or a panorama can exceed honestly
        return (
            f"too large to decode safely ({exc.args[0] if exc.args else exc}); save a "
            "smaller copy (the model sees it at data.image.size anyway)"
        )
    return f"not a decodable image ({type(exc).__name__}: {exc})"


def _check_after_decoding(
    counts: dict[str, dict[str, int]], class_names: list[str], bad: list[str]
) -> None:
    """After skipping bad files every class still needs a training example."""
    missing = [c for c in class_names if counts["train"].get(c, 0) == 0]
    empty = [s for s in SPLITS if not counts[s]]
    if missing or empty:
        what = []
        if missing:
            what.append(f"classes with no training example: {', '.join(missing)}")
        if empty:
            what.append(f"empty splits: {', '.join(empty)}")
        raise DataError(
            f"after skipping {len(bad)} undecodable file(s), {'; '.join(what)}. "
            f"Fix or replace the bad files, e.g. {', '.join(bad[:3])}."
        )
    if bad:
        log.warning(
            "skipped %d undecodable file(s) (data.on_bad_file: skip)%s",
            len(bad),
            f"; the first {MAX_FILE_WARNINGS} are above, all are listed in the manifest "
            "(skipped_files)"
            if len(bad) > MAX_FILE_WARNINGS
            else "",
        )
