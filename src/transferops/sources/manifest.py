"""The source folder: one writer for every kind, its manifest, and its checksum.

``source.out/`` holds the weights (safetensors; a Hugging Face folder for text) and
``manifest.json``: kind, name, origin, family, blocks, feature width, input spec
(normalisation or tokenizer), the weights' sha256 and the hash of the ``source:`` params
that produced it. :func:`verify` refuses weights whose sha256 does not match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from transferops.errors import SourceError
from transferops.model.families import discover
from transferops.model.inputs import input_side
from transferops.runtime.artifacts import (
    atomic_dir,
    read_json,
    save_weights,
    sha256_file,
    write_json_atomic,
)

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


@dataclass
class Pulled:
    """A source model resolved and loaded by one of the kinds, ready to be written."""

    kind: str  # the architecture's kind (for `mlflow`: that of the model it was tuned from)
    name: str
    model: nn.Module  # pretrained weights loaded
    family: str
    origin: str  # where the weights came from, for humans and lineage tags
    input: dict[str, Any]  # {"type": "image", mean, std} or {"type": "text", tokenizer, ...}
    save: Callable[[Path], str]  # writes the weights into a folder, returns their file name
    user_blocks: list[list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the registered version


def torch_weights(model: nn.Module) -> Callable[[Path], str]:
    """A `Pulled.save` writing `model`'s state dict as safetensors."""

    def save(folder: Path) -> str:
        save_weights(model, folder / WEIGHTS)
        return WEIGHTS

    return save


def write_source(out: Path, pulled: Pulled, spec_hash: str) -> dict[str, Any]:
    """Write weights + manifest to `out` atomically; returns the manifest."""
    blocks, _, feat_dim = discover(pulled.model, pulled.family, user_blocks=pulled.user_blocks)
    with atomic_dir(out) as tmp:
        wfile = pulled.save(tmp)
        manifest = {
            "kind": pulled.kind,
            "name": pulled.name,
            "origin": pulled.origin,
            "family": pulled.family,
            "user_blocks": pulled.user_blocks,
            "num_blocks": len(blocks),
            "block_names": [n for n, _ in blocks],
            "feat_dim": feat_dim,
            "input": pulled.input,
            "weights_file": wfile,
            "sha256": sha256_file(tmp / wfile),
            "spec_hash": spec_hash,
            **pulled.extra,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def source_id(manifest: dict[str, Any]) -> str:
    """What a model trained on this pulled source depends on: its weights' sha256, and the
    input size the ranking chose when the model resizes its images to one (the same weights
    at another size train another model). Reuse, resume and study names compare this."""
    size = input_side(manifest, None)
    return f"{manifest['sha256']}@{size}px" if size else str(manifest["sha256"])


def read_source_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of a pulled source, with a clear error when missing."""
    p = Path(path) / MANIFEST
    if not p.exists():
        raise SourceError(f"{p} not found: run `transferops pull` first")
    return read_json(p)


def verify(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a weights file whose sha256 differs from its manifest."""
    wfile = Path(path) / manifest["weights_file"]
    if not wfile.exists():
        raise SourceError(f"{wfile} is missing: run `transferops pull --force`")
    actual = sha256_file(wfile)
    if actual != manifest["sha256"]:
        raise SourceError(
            f"checksum mismatch: {wfile} has sha256 {actual[:16]}... but its manifest says "
            f"{manifest['sha256'][:16]}...; the file was modified or corrupted. Refusing to load "
            "it: run `transferops pull --force` to fetch it again."
        )
