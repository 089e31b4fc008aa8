"""`transferops register`: a fine-tuned, evaluated model becomes an MLflow model version.

``register`` logs ``finetune.out`` as an MLflow pyfunc model (:mod:`transferops.model.serving`:
raw images or texts in, labels out; signature and input example included), creates a version
of ``registry.model_name`` tagged with its lineage (:func:`lineage_tags`), logs a model card,
and points the alias ``challenger`` at it. The same model (same weights' sha256) registered
again returns the existing version: no second version. Moving ``champion`` is
:mod:`transferops.registry.promote`'s job.

The registered model carries only inference code (:data:`SHIPPED_MODULES`: the
:mod:`transferops.model` package) and pins only what that code imports.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from transferops.config import Config, registered_model_name
from transferops.data.prepared import load_prepared, read_manifest
from transferops.errors import RegistryError
from transferops.model.families import family
from transferops.model.folder import SPEC_FILE, WEIGHTS_FILE
from transferops.registry.client import CHALLENGER
from transferops.registry.lineage import METRICS, lineage_tags, trained_params
from transferops.registry.model_card import model_card
from transferops.runtime.artifacts import read_json, sha256_file, write_json_atomic
from transferops.runtime.progress import quiet
from transferops.runtime.redact import mask
from transferops.runtime.tracking import log_data, setup_tracking, start_run

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # the logged MLflow model's name inside the register run


@dataclass
class RegisterResult:
    """What `register` did."""

    name: str
    version: str
    created: bool
    run_id: str
    tags: dict[str, str]


# ------------------------------------------------------------------- inputs


def _registered_inputs(cfg: Config) -> tuple[Path, dict, dict, dict | None]:
    """The model folder, its spec and its evaluation, checked to belong together."""
    model_dir = Path(cfg.finetune.out)
    if not (model_dir / SPEC_FILE).exists():
        raise RegistryError(f"{model_dir / SPEC_FILE} not found: run `transferops train` first")
    spec = read_json(model_dir / SPEC_FILE)
    metrics_path = Path(cfg.evaluate.out) / "metrics.json"
    if not metrics_path.exists():
        raise RegistryError(f"{metrics_path} not found: run `transferops evaluate` first")
    metrics = read_json(metrics_path)
    sha = sha256_file(model_dir / WEIGHTS_FILE)
    ft = metrics.get("finetuned")
    if ft is None or ft.get("model_sha256") != sha:
        raise RegistryError(
            f"{metrics_path} does not score the model in {model_dir} (weights changed since "
            "the evaluation): run `transferops evaluate` again, then register"
        )
    data_hash = read_manifest(cfg.data.out)["data_hash"]
    if metrics["data_hash"] != data_hash or spec["data_hash"] != data_hash:
        raise RegistryError(
            f"{cfg.data.out} changed since {model_dir} was trained and evaluated: re-run "
            "`transferops train` and `transferops evaluate` (or `transferops run`)"
        )
    summary_path = Path(cfg.search.out) / "summary.json"
    search = read_json(summary_path) if summary_path.exists() else None
    return model_dir, spec, metrics, search


# ------------------------------------------------------------------ register


def _signature_and_example(spec: dict, model_dir: Path, cfg: Config) -> tuple[Any, Any]:
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("double", "confidence"),
            ColSpec(Array(DataType.double), "probabilities"),  # per class, class_names order
        ]
    )
    train = load_prepared(cfg.data.out, "train")  # an example input, never the test split
    if spec["modality"] == "text":
        example = pd.DataFrame({"text": (train.texts or [""])[:2]})
        return ModelSignature(Schema([ColSpec("string", "text")]), outputs), example
    from PIL import Image

    assert train.images is not None
    encoded = []
    for img in train.images[:2]:
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    example = pd.DataFrame({"image": encoded})
    return ModelSignature(Schema([ColSpec("binary", "image")]), outputs), example


# The inference code a registered model carries: the model/ package and the two modules it
# imports, never the trainer. A test checks the set is closed under imports and loads the
# model without transferops installed.
PACKAGE = Path(__file__).resolve().parents[1]
SHIPPED_MODULES = (
    *sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "model").glob("*.py")),
    "runtime/artifacts.py",
    "errors.py",
)
PYFUNC_ENTRY = "model/_pyfunc_entry.py"
# What those modules import (transformers / the architecture's package come from the family).
INFERENCE_REQUIREMENTS = ("torch", "mlflow", "pandas", "numpy", "pillow", "safetensors")


def shipped_code(dst: Path) -> Path:
    """A ``transferops`` package in `dst` holding only :data:`SHIPPED_MODULES`."""
    pkg = dst / "transferops"
    for rel in SHIPPED_MODULES:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE / rel, pkg / rel)
    for folder in {(pkg / rel).parent for rel in SHIPPED_MODULES}:
        (folder / "__init__.py").write_text(
            '"""transferops inference code (a registered model)."""\n'
        )
    return pkg


def requirements(spec: dict[str, Any]) -> list[str]:
    """Pinned pip requirements of the pyfunc (explicit: skips MLflow's slow inference).

    transferops itself is not among them: its inference code ships inside the model
    (``code_paths``), so the model loads where transferops is not installed.
    """
    pkgs = dict.fromkeys([*INFERENCE_REQUIREMENTS, family(spec["source"]["family"]).requirement])
    return [f"{p}=={version(p)}" for p in pkgs]  # once each (the pixel model's is torch)


def find_version(client: Any, name: str, model_sha: str) -> Any | None:
    """The version of `name` holding these exact weights, if registered already."""
    found = client.search_model_versions(f"name='{name}' and tags.model_sha256='{model_sha}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _log_model(
    mlflow: Any, pkg: Path, model_dir: Path, signature: Any, example: Any, spec: dict
) -> Any:
    """The pyfunc logged from code (nothing pickled), the model folder as its artifact."""
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=str(pkg / PYFUNC_ENTRY),
        artifacts={"model": str(model_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=requirements(spec),
        code_paths=[str(pkg)],
        metadata={"class_names": spec["class_names"], "modality": spec["modality"]},
    )


def log_version(
    mlflow: Any, client: Any, name: str, model_dir: Path, spec: dict, tags: dict, cfg: Config
) -> Any:
    """In the active run: the model folder logged as a pyfunc (its inference code shipped,
    signature and example given), a version of `name` created from it with `tags`, and the
    logged model pointed at that version. Returns the model version."""
    signature, example = _signature_and_example(spec, model_dir, cfg)
    with tempfile.TemporaryDirectory(prefix="transferops-code-") as code:
        pkg = shipped_code(Path(code))
        # The signature is given: MLflow's "validating input example" line is noise here
        # (its type-hint hint is off at the class: TransferopsModel)
        quiet("mlflow.pyfunc")
        info = _log_model(mlflow, pkg, model_dir, signature, example, spec)
    run_id = mlflow.active_run().info.run_id
    mv = client.create_model_version(
        name, info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id
    )
    # What mlflow.register_model also records: the logged model's page then shows the
    # version ("Registered: v1"), not "Not registered".
    client.set_logged_model_tags(
        info.model_id,
        {"mlflow.modelVersions": json.dumps([{"name": name, "version": mv.version}])},
    )
    return mv


def register(cfg: Config) -> RegisterResult:
    """Register finetune.out (evaluated) as a new version with alias `challenger`."""
    from mlflow import MlflowClient

    model_dir, spec, metrics, search = _registered_inputs(cfg)
    model_sha = metrics["finetuned"]["model_sha256"]
    name = registered_model_name(cfg)
    mlflow = setup_tracking(cfg.tracking)
    client = MlflowClient()
    existing = find_version(client, name, model_sha)
    if existing is not None:
        client.set_registered_model_alias(name, CHALLENGER, existing.version)
        log.info("%s v%s already holds these weights: not registered again", name, existing.version)
        res = RegisterResult(name, str(existing.version), False, existing.run_id, existing.tags)
        _write_receipt(cfg, res, client)
        return res

    tags = lineage_tags(cfg, spec, metrics, search, model_sha)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(
            name, description="Fine-tuned by transferops; see each version's model card."
        )
    run_tags = {"role": "registered-model", **{k: tags[k] for k in ("data_hash", "model_sha256")}}
    with start_run(mlflow, run_name=f"register-{name}", tags=run_tags) as run:
        mlflow.log_params(trained_params(spec))
        log_data(mlflow, cfg.data.out, Path(cfg.data.path).name, tags["data_hash"], "training")
        mlflow.log_metrics({f"test_{m}": metrics["finetuned"][m] for m in METRICS})
        mv = log_version(mlflow, client, name, model_dir, spec, tags, cfg)
        card = model_card(name, str(mv.version), tags, spec, metrics)
        mlflow.log_text(card, "model_card.md")
    client.update_model_version(name, mv.version, description=card)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    log.info("registered %s v%s (alias %s)", name, mv.version, CHALLENGER)
    res = RegisterResult(name, str(mv.version), True, run.info.run_id, tags)
    _write_receipt(cfg, res, client)
    return res


def _write_receipt(cfg: Config, res: RegisterResult, client: Any) -> None:
    """registry.out: which version holds which weights and every alias it holds now
    (DVC's output of `register`; `promote` moves champion later, the registry says so)."""
    aliases = sorted(client.get_model_version(res.name, res.version).aliases or [CHALLENGER])
    write_json_atomic(
        Path(cfg.registry.out),
        {
            "model_name": res.name,
            "version": res.version,
            "aliases": aliases,
            "model_sha256": res.tags.get("model_sha256"),
            "data_hash": res.tags.get("data_hash"),
            "mlflow_run_id": res.run_id,
            "tracking_uri": mask(cfg.tracking.uri),
        },
    )
