"""Dataset readers: an image folder, a text/image table (CSV, TSV, JSONL).

A reader only *lists* examples and checks the layout (cheap); decoding happens once in
``prepare``. Every layout problem is a :class:`DataError` that names the folder, file or
params key and says what would fix it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from transferops.config import DataConfig
from transferops.errors import DataError

log = logging.getLogger(__name__)

SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")

# Folder / column values accepted for each split (case-insensitive).
SPLIT_ALIASES: dict[str, SplitName] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class Example:
    """One labelled example: an image file or a text."""

    label: str
    split: SplitName | None = None
    path: Path | None = None
    text: str | None = None


@dataclass
class RawDataset:
    """What a reader found: examples plus the files whose content defines them."""

    modality: Literal["image", "text"]
    root: Path
    examples: list[Example]
    files: list[Path]
    ignored: list[Path] = field(default_factory=list)

    @property
    def has_given_splits(self) -> bool:
        """True when the data came with split folders / a split column."""
        return any(e.split is not None for e in self.examples)


def read_dataset(cfg: DataConfig) -> RawDataset:
    """List the examples of the configured dataset (no decoding)."""
    if cfg.format == "image_folder":
        return read_image_folder(cfg.path, cfg.image.extensions, cfg.on_empty_class)
    return read_table(cfg)


# ----------------------------------------------------------------- image folder


def _visible_dirs(folder: Path, root: Path, looped: list[Path]) -> list[Path]:
    """The sub-folders of `folder` that can be classes or splits. A symlink to a folder inside
    `root`, to `root` itself or to one of its parents is not one (it would make a class of
    copies of the other classes' images): it goes to `looped`."""
    real_root = root.resolve()
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink():
            target = p.resolve()
            if target == real_root or real_root in target.parents or target in real_root.parents:
                looped.append(p)
                continue
        found.append(p)
    return found


def _scan_class_folder(folder: Path, extensions: list[str], ignored: list[Path]) -> list[Path]:
    """Image files under a class folder (recursively); other files go to `ignored`."""
    found = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        hidden = any(part.startswith(".") for part in p.relative_to(folder).parts)
        if p.suffix.lower() in extensions and not hidden:  # not .DS_Store, .ipynb_checkpoints/
            found.append(p)
        else:
            ignored.append(p)
    return found


def read_image_folder(root: Path, extensions: list[str], on_empty: str = "skip") -> RawDataset:
    """Read ``root/<class>/*`` or ``root/<split>/<class>/*`` (split = train/val/test aliases).
    Class folders without images are skipped with one warning (`on_empty` "skip") or
    refused, all of them in one message ("fail")."""
    root = Path(root)
    if not root.exists():
        raise DataError(
            f"data.path: folder {root} does not exist. Put one sub-folder per class in it "
            "(e.g. data/raw/cats/*.jpg, data/raw/dogs/*.jpg), or set data.demo: digits to "
            "write the built-in demo there."
        )
    if not root.is_dir():
        raise DataError(
            f"data.path: {root} is a file, but data.format is image_folder. Point data.path at a "
            "folder of class sub-folders, or set data.format: table for a CSV/JSONL file."
        )
    looped: list[Path] = []
    top = _visible_dirs(root, root, looped)
    if not top:
        raise DataError(
            f"data.path: {root} has no sub-folders. Expected one sub-folder per class "
            "(or train/ val/ test/ folders that each hold class sub-folders)."
        )
    ignored: list[Path] = [p for p in root.iterdir() if p.is_file()]
    split_dirs = {d: SPLIT_ALIASES.get(d.name.lower()) for d in top}
    is_split_layout = all(split_dirs.values()) and "train" in split_dirs.values()

    examples: list[Example] = []
    files: list[Path] = []
    empty: list[Path] = []
    if is_split_layout:
        seen: dict[SplitName, Path] = {}
        for d, split in split_dirs.items():
            assert split is not None
            if split in seen:
                raise DataError(
                    f"data.path: {seen[split].name}/ and {d.name}/ both mean the {split} split; "
                    "keep one of them."
                )
            seen[split] = d
            class_dirs = _visible_dirs(d, root, looped)
            if not class_dirs:
                raise DataError(f"split folder {d} has no class sub-folders")
            ignored += [p for p in d.iterdir() if p.is_file()]
            for cdir in class_dirs:
                imgs = _scan_class_folder(cdir, extensions, ignored)
                if not imgs:
                    empty.append(cdir)
                files += imgs
                examples += [Example(label=cdir.name, split=split, path=p) for p in imgs]
    else:
        for cdir in top:
            imgs = _scan_class_folder(cdir, extensions, ignored)
            if not imgs:
                empty.append(cdir)
            files += imgs
            examples += [Example(label=cdir.name, path=p) for p in imgs]
    if looped:
        _warn_looped(looped, root)
    if empty:
        _empty_classes(empty, root, extensions, on_empty)
    if ignored:
        log.warning(
            "ignored %d file(s) that are not images (%s%s)",
            len(ignored),
            ", ".join(str(p.relative_to(root)) for p in ignored[:3]),
            ", ..." if len(ignored) > 3 else "",
        )
    _check_classes(examples, str(root))
    return RawDataset("image", root, examples, files, ignored)


def _warn_looped(looped: list[Path], root: Path) -> None:
    log.warning(
        "skipped %d symlinked folder(s) that point back into %s or above it (not classes: "
        "they would repeat other classes' images): %s",
        len(looped),
        root,
        ", ".join(f"{p.relative_to(root)} -> {os.readlink(p)}" for p in looped),
    )


def _empty_classes(empty: list[Path], root: Path, extensions: list[str], on_empty: str) -> None:
    names = ", ".join(str(p.relative_to(root)) for p in empty)
    if on_empty == "fail":
        raise DataError(
            f"{len(empty)} class folder(s) in {root} have no image files: {names} (accepted "
            f"extensions: {', '.join(extensions)}; set data.image.extensions to add more). Add "
            "images, remove the folders, or set data.on_empty_class: skip."
        )
    log.warning(
        "skipped %d class folder(s) with no image files: %s (data.on_empty_class: skip)",
        len(empty),
        names,
    )


def _check_classes(examples: list[Example], where: str) -> None:
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        found = f"only class {labels[0]!r}" if labels else "no classes"
        raise DataError(f"{where}: found {found}; classification needs at least 2 classes.")


# ------------------------------------------------------------------------ table


def read_table_file(path: Path, delimiter: str | None = None) -> pd.DataFrame:
    """A CSV / TSV / JSON(L) table as `prepare` reads it: strings, a byte-order mark
    stripped; a file that cannot be parsed is a :class:`DataError`."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")
        if suffix == ".json":
            return pd.read_json(path, dtype=False, encoding="utf-8-sig")
        sep = delimiter if delimiter is not None else ("\t" if suffix == ".tsv" else None)
        return pd.read_csv(
            path,
            sep=sep,
            engine="python",
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",  # a byte-order mark (Excel's CSVs) is not part of a name
        )
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        kind = "JSON lines" if suffix in (".jsonl", ".ndjson", ".json") else "CSV"
        raise DataError(
            f"data.path: could not read {path} as {kind}: {exc}. Check the file is UTF-8 "
            f"{kind}{'' if kind != 'CSV' else ' (set data.table.delimiter if it is not a comma)'}."
        ) from None


def read_table(cfg: DataConfig) -> RawDataset:
    """Read a CSV/TSV/JSONL table with a text (or image-path) column and a label column."""
    path = Path(cfg.path)
    t = cfg.table
    if not path.exists():
        raise DataError(
            f"data.path: table {path} does not exist (data.format is table). Point data.path at "
            "a .csv, .tsv or .jsonl file."
        )
    if path.is_dir():
        raise DataError(
            f"data.path: {path} is a folder but data.format is table; point it at the CSV/JSONL "
            "file, or set data.format: image_folder."
        )
    df = read_table_file(path, t.delimiter)
    if df.empty:
        raise DataError(f"data.path: table {path} has no rows")
    cols = [str(c) for c in df.columns]
    wanted = {"data.table.label_column": t.label_column}
    if t.image_column:
        wanted["data.table.image_column"] = t.image_column
    else:
        wanted["data.table.text_column"] = t.text_column or ""
    if t.split_column:
        wanted["data.table.split_column"] = t.split_column
    for key, col in wanted.items():
        if col not in df.columns:
            raise DataError(
                f"{key}: column {col!r} is not in {path}; its columns are: {', '.join(cols)}. "
                f"Set {key} to one of them."
            )
    value_col = t.image_column or t.text_column
    assert value_col is not None
    labels = df[t.label_column].astype(str).str.strip()
    values = df[value_col].astype(str)
    keep = (labels != "") & (labels.str.lower() != "nan") & (values.str.strip() != "")
    dropped = int((~keep).sum())
    if dropped:
        log.warning("dropped %d row(s) of %s with an empty label or %s", dropped, path, value_col)
    splits: list[SplitName | None] = [None] * len(df)
    if t.split_column:
        splits = []
        for i, v in enumerate(df[t.split_column].astype(str)):
            s = SPLIT_ALIASES.get(v.strip().lower())
            if s is None and keep.iloc[i]:
                raise DataError(
                    f"data.table.split_column: row {i + 2} of {path} has split {v!r}; allowed: "
                    f"{', '.join(sorted(SPLIT_ALIASES))}"
                )
            splits.append(s)

    examples: list[Example] = []
    files = [path]
    for i in range(len(df)):
        if not keep.iloc[i]:
            continue
        if t.image_column:
            img = Path(values.iloc[i].strip())
            img = img if img.is_absolute() else path.parent / img
            examples.append(Example(label=labels.iloc[i], split=splits[i], path=img))
            if img.is_file():
                files.append(img)
        else:
            examples.append(Example(label=labels.iloc[i], split=splits[i], text=values.iloc[i]))
    _check_classes(examples, str(path))
    return RawDataset("image" if t.image_column else "text", path.parent, examples, files)
