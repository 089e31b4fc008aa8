"""`transferops init`: a project of the user's own, next to their data.

Writes ``params.yaml`` (the package's commented template, every key, with the ``data:`` and
``source:`` values set for the data found), a ``dvc.yaml`` whose stages call the installed
``transferops`` (the template's stages, without this repository's code dependencies and demo
stage), and ``.gitignore`` / ``.dvcignore`` for the stores and outputs. The data format is
detected: an image folder (with or without train/val/test folders, checked by the same
reader `prepare` uses) or a table whose text / image / label / split columns are guessed
from its header and values, and said. Existing files are kept unless ``force``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd

from transferops.config import IMAGE_EXTENSIONS, DataConfig, load_config
from transferops.data.prepare import assign_splits
from transferops.data.readers import (
    SPLIT_ALIASES,
    RawDataset,
    read_dataset,
    read_image_folder,
    read_table_file,
)
from transferops.errors import ConfigError, DataError

TEMPLATES = files("transferops.pipeline") / "templates"
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".jsonl", ".ndjson", ".json")
WRITTEN = ("params.yaml", "dvc.yaml", ".gitignore", ".dvcignore")
# The text encoder a text table starts from (the packaged MiniLM, offline).
TEXT_SOURCE = {
    "kind": "hf",
    "name": "sentence-transformers/all-MiniLM-L6-v2",
    "weights": None,
}
LABEL_NAMES = ("label", "labels", "class", "category", "target", "y", "tag")
TEXT_NAMES = ("text", "sentence", "content", "review", "body", "document", "message", "comment")
SPLIT_NAMES = ("split", "set", "subset", "fold", "partition")
IGNORED = """\
# transferops: stores and outputs (DVC tracks data/ and models/ outputs; never commit
# weights or data). metrics/ and reports/ are small and meant for git.
/models/
/data/prepared/
/checkpoints/
/dvc_plots/
/mlartifacts/
mlflow.db
optuna.db
*.safetensors
.transferops/
.transferops.lock
"""
DVC_IGNORED = ".transferops/\nmlartifacts/\nmlflow.db\noptuna.db\n"


@dataclass
class Detected:
    """What `init` found in the data, and the params it sets for it."""

    data: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    said: list[str] = field(default_factory=list)
    # what `prepare` would stop at with these params (a class too small to split, ...)
    problems: list[str] = field(default_factory=list)


def detect(data: Path, project: Path) -> Detected:
    """The data's format and the ``data:`` / ``source:`` values for it (paths relative to
    `project` when inside it)."""
    if not data.exists():
        raise DataError(f"--data {data}: no such folder or file")
    rel = Path(relative_if_inside(data, project))
    if data.is_dir():
        raw = read_image_folder(data, list(IMAGE_EXTENSIONS))  # the layout checks prepare does
        classes = sorted({e.label for e in raw.examples})
        layout = "with train/val/test folders" if raw.has_given_splits else "one folder per class"
        found = Detected(
            {"demo": None, "format": "image_folder", "path": str(rel), "limit_per_class": None},
            said=[
                f"image folder ({layout}): {len(raw.examples)} images in {len(classes)} classes"
                f" ({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''})"
            ],
        )
        found.problems = split_problems(found.data, data, raw)
        return found
    if data.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(
            f"--data {data}: expected an image folder or a table ({', '.join(TABLE_SUFFIXES)})"
        )
    found = _detect_table(data, rel)
    found.problems = split_problems(found.data, data)
    return found


def split_problems(params: dict[str, Any], data: Path, raw: RawDataset | None = None) -> list[str]:
    """What `prepare` would stop at when it splits the data with the ``data:`` values
    `params` (the template's split settings): said by `init`, before the user's first run."""
    d = DataConfig.model_validate(params | {"path": str(data)})
    try:
        assign_splits(raw if raw is not None else read_dataset(d), d)
    except DataError as exc:
        return [f"prepare will stop here: {exc}"]
    return []


def relative_if_inside(path: Path, start: Path) -> str:
    """`path` relative to `start` when inside it, else absolute."""
    path, start = path.resolve(), start.resolve()
    return str(path.relative_to(start)) if path.is_relative_to(start) else str(path)


def _detect_table(data: Path, rel: Path) -> Detected:
    df = read_table_file(data).head(200)  # as prepare reads it
    cols = {c.lower(): c for c in df.columns}

    def named(names: tuple[str, ...]) -> str | None:
        return next((cols[n] for n in names if n in cols), None)

    strings = [c for c in df.columns if pd.api.types.is_string_dtype(df[c])]
    split = named(SPLIT_NAMES)
    if split is not None and not set(df[split].astype(str).str.lower()) <= set(SPLIT_ALIASES):
        split = None  # a column called "set" that does not hold train/val/test
    images = [
        c for c in strings if df[c].astype(str).str.lower().str.endswith(IMAGE_EXTENSIONS).all()
    ]
    label = named(LABEL_NAMES) or min(
        (c for c in strings if c not in (split, *images) and df[c].nunique() > 1),
        key=lambda c: df[c].nunique(),
        default=None,
    )
    if label is None:
        raise DataError(f"--data {data}: no column looks like a label ({', '.join(df.columns)})")
    table: dict[str, Any] = {"label_column": label, "split_column": split}
    if images:
        table |= {"image_column": images[0], "text_column": None}
        kind, source = "image paths", {}
    else:
        text = named(TEXT_NAMES) or max(
            (c for c in strings if c not in (label, split)),
            key=lambda c: df[c].astype(str).str.len().mean(),
            default=None,
        )
        if text is None:
            raise DataError(f"--data {data}: no text or image-path column in {list(df.columns)}")
        table |= {"text_column": text}
        kind, source = "texts", TEXT_SOURCE
    said = [
        f"table of {kind}: "
        + ", ".join(f"{k.removesuffix('_column')} column {v!r}" for k, v in table.items() if v)
        + " (guessed from the header: check data.table in params.yaml)"
    ]
    return Detected(
        {
            "demo": None,
            "format": "table",
            "path": str(rel),
            "limit_per_class": None,
            "table": table,
        },
        source,
        said,
    )


def set_value(text: str, dotted: str, value: Any) -> str:
    """`text` (a commented params.yaml) with the value of `dotted` (e.g. data.table.
    label_column) replaced in place: its comment and every other line kept."""
    *sections, key = dotted.split(".")
    start, indent = 0, ""
    for s in sections:  # the section's block, one level deeper each time
        m = re.compile(rf"^{indent}{re.escape(s)}:[^\n]*\n", re.M).search(text, start)
        if m is None:
            raise ConfigError(f"the params template has no section {dotted.rsplit('.', 1)[0]}")
        start, indent = m.end(), indent + "  "
    line = re.compile(rf"^({indent}{re.escape(key)}:)( *)([^#\n]*?)( *)(#[^\n]*)?$", re.M)
    m = line.search(text, start)
    if m is None:
        raise ConfigError(f"the params template has no key {dotted}")
    shown = "null" if value is None else str(value)
    new = f"{m[1]} {shown}"
    if m[5]:  # the comment stays in its column where the new value leaves room
        column = len(m[1]) + len(m[2]) + len(m[3]) + len(m[4])
        new += " " * max(1, column - len(new)) + m[5]
    return text[: m.start()] + new + text[m.end() :]


def project_dvc_yaml() -> str:
    """The template's stages for a user's project: no demo stage, no code dependencies of
    this repository (the installed transferops is the code)."""
    lines = (TEMPLATES / "dvc.yaml").read_text().splitlines(keepends=True)
    out, skip = [], False
    for line in lines:
        if re.match(r"^  demo_data:", line):
            skip = True
            continue
        if skip and re.match(r"^  \w", line):
            skip = False
        if skip or line.strip().startswith("- src/"):
            continue
        out.append(line)
    return "".join(out)


def init(
    project: Path, data: Path, force: bool = False, git: bool = False, dvc: bool = False
) -> Detected:
    """Write the project files for `data` into `project` (and `git` / `dvc` init it, the
    data added to DVC); what was found in the data."""
    project.mkdir(parents=True, exist_ok=True)
    there = [f for f in WRITTEN if (project / f).exists()]
    if there and not force:
        raise ConfigError(
            f"{project}: {', '.join(there)} already there; keep them, or pass --force to "
            "overwrite them"
        )
    found = detect(data, project)
    params = (TEMPLATES / "params.yaml").read_text()
    for k, v in found.data.items():
        if k == "table":
            for tk, tv in v.items():
                params = set_value(params, f"data.table.{tk}", tv)
        else:
            params = set_value(params, f"data.{k}", v)
    for k, v in found.source.items():
        params = set_value(params, f"source.{k}", v)
    (project / "params.yaml").write_text(params)
    load_config(project / "params.yaml")  # what it wrote validates, or one line now
    (project / "dvc.yaml").write_text(project_dvc_yaml())
    (project / ".gitignore").write_text(IGNORED)
    (project / ".dvcignore").write_text(DVC_IGNORED)
    if git:
        _sh(["git", "init", "-q"], project)
    if dvc:
        _sh([_tool("dvc"), "init", "-q"] + ([] if git else ["--no-scm"]), project)
        if data.resolve().is_relative_to(project.resolve()):
            _sh([_tool("dvc"), "add", "-q", relative_if_inside(data, project)], project)
    return found


def _tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else (shutil.which(name) or name)


def _sh(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"{' '.join(cmd)} failed in {cwd}: {done.stderr.strip()[-300:]}")
