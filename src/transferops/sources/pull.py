"""Source models: resolve pretrained weights offline-first, write them with a manifest, load.

One module per ``source.kind`` (:mod:`.torchvision`, :mod:`.efficientnet_lite`, :mod:`.hf`,
:mod:`.local`, :mod:`.mlflow`); each first decides where the weights come from
(``resolve``), then loads them into the architecture (``load``), and :mod:`.manifest` writes
every kind the same way. :func:`pull` writes ``source.out/`` (a second pull of the same spec
does nothing); :func:`load_source` refuses weights whose sha256 differs from the manifest.
Nothing is ever unpickled: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from transferops.config import Config, SourceConfig
from transferops.model.families import build_architecture
from transferops.model.folder import HF_DIR
from transferops.model.inputs import input_side
from transferops.runtime.artifacts import read_json, sha256_json
from transferops.runtime.redact import mask
from transferops.sources import efficientnet_lite, hf, local, mlflow, torchvision
from transferops.sources.manifest import MANIFEST, read_source_manifest, verify, write_source

log = logging.getLogger(__name__)

__all__ = [
    "PullResult",
    "SourceModel",
    "load_source",
    "pull",
    "pull_from_config",
    "random_init",
    "read_source_manifest",
    "verify",
]

LOADERS = {
    "torchvision": torchvision.load,
    "efficientnet_lite": efficientnet_lite.load,
    "hf": hf.load,
    "local": local.load,
}


@dataclass
class PullResult:
    """What `pull` did."""

    out: Path
    manifest: dict[str, Any]
    skipped: bool


@dataclass
class SourceModel:
    """A loaded, checksum-verified source model and its manifest."""

    model: nn.Module
    manifest: dict[str, Any]
    path: Path

    @property
    def family(self) -> str:
        """The model family (a key of :data:`transferops.model.families.FAMILIES`)."""
        return str(self.manifest["family"])


def pull_from_config(
    cfg: Config, force: bool = False, ranking: dict[str, Any] | None = None
) -> PullResult:
    """`pull` with a registry source defaulting to ``tracking.uri``."""
    registry_uri = cfg.source.registry_uri or cfg.tracking.uri
    return pull(cfg.source, force=force, registry_uri=registry_uri, ranking=ranking)


def pull(
    cfg: SourceConfig,
    force: bool = False,
    registry_uri: str | None = None,
    ranking: dict[str, Any] | None = None,
) -> PullResult:
    """Resolve the configured source model and write it to ``cfg.out`` (no-op if up to date).

    `registry_uri` is where kind ``mlflow`` looks up ``source.name`` (default: its own
    ``registry_uri``, else ``sqlite:///mlflow.db``). `ranking` (how ``source.name`` was
    chosen from ``source.candidates``) is kept in the manifest, so the model folders,
    the report and the model card carry it.
    """
    out = Path(cfg.out)
    spec_hash = sha256_json({**cfg.model_dump(mode="json", exclude={"out"}), "ranking": ranking})
    # An alias can move: resolve it before deciding "up to date".
    registered = mlflow.resolve(cfg, registry_uri) if cfg.kind == "mlflow" else None
    if not force and (out / MANIFEST).exists():
        manifest = read_json(out / MANIFEST)
        was = manifest.get("registered") or {}
        moved = registered is not None and (
            (was.get("version"), was.get("registry_uri"))
            != (registered["version"], mask(registered["registry_uri"]))
        )
        if manifest.get("spec_hash") == spec_hash and not moved:
            verify(out, manifest)  # refuses a tampered / corrupted weights file
            log.info("source model in %s is up to date (%s)", out, manifest["origin"])
            return PullResult(out, manifest, True)
        if moved and manifest.get("spec_hash") == spec_hash:
            log.info(
                "%s now resolves to version %s (was %s): pulling it",
                cfg.name,
                registered["version"],
                was.get("version"),
            )  # type: ignore[index]
    with tempfile.TemporaryDirectory(prefix="transferops-pull-") as work:
        if registered is not None:
            pulled = mlflow.load(cfg, Path(work), registered)
        else:
            pulled = LOADERS[cfg.kind](cfg, Path(work))
        if ranking is not None:
            pulled.extra["ranking"] = ranking
            if ranking.get("input_size"):  # the model upsamples its images to this side
                pulled.input = {**pulled.input, "size": ranking["input_size"]}
        manifest = write_source(out, pulled, spec_hash)
    log.info("pulled %s into %s (%d blocks)", manifest["origin"], out, manifest["num_blocks"])
    return PullResult(out, manifest, False)


def random_init(source: SourceModel, image_size: int | None = None) -> SourceModel:
    """The same architecture with fresh random weights (for from-scratch baselines).

    Seed with torch.manual_seed before calling for a reproducible init.
    """
    m = source.manifest
    if m["kind"] == "hf":
        from transformers import AutoModel

        model = AutoModel.from_config(source.model.config)
    else:
        model, _ = build_architecture(m["kind"], m["name"], input_side(m, image_size))
    return SourceModel(model, {**m, "origin": f"random init of {m['origin']}"}, source.path)


def load_source(path: Path | str, image_size: int | None = None) -> SourceModel:
    """Load a pulled source model after verifying its checksum (safetensors only), built for
    the input side it will see (:func:`input_side`: the ranked size, else `image_size`)."""
    path = Path(path)
    manifest = read_source_manifest(path)
    verify(path, manifest)
    if manifest["kind"] == "hf":
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path / HF_DIR, local_files_only=True)
    else:
        side = input_side(manifest, image_size)
        model, _ = build_architecture(manifest["kind"], manifest["name"], side)
        model.load_state_dict(load_file(str(path / manifest["weights_file"])), strict=True)
    return SourceModel(model, manifest, path)
