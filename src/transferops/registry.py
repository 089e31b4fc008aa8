"""MLflow model registry: `register` a fine-tuned model with its lineage, `promote` it.

``register`` logs ``finetune.out`` as an MLflow pyfunc model (:mod:`transferops.serving`:
raw images or texts in, labels out; signature and input example included), creates a version
of ``registry.model_name`` tagged with its lineage, logs a model card, and points the alias
``challenger`` at it. The same model (same weights' sha256) registered again returns the
existing version: no second version.

``promote`` moves the alias ``champion`` to the challenger only when both gates pass:

1. baseline gate: the evaluation says transfer beats the from-scratch baseline
   (``registry.baseline_gate``: ``significant`` = the verdict's interval is above 0;
   ``mean`` = the model's test metric is above the scratch mean);
2. champion gate: the challenger's test ``registry.metric`` beats the champion's by more
   than 0 and at least ``registry.min_improvement``, on the same test split. A champion
   registered on other data is re-scored on the current test split first.

Otherwise nothing changes and the decision says why. The first model passes gate 2.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferops.artifacts import read_json, sha256_file, write_json_atomic
from transferops.config import Config, FinetuneConfig
from transferops.data.prepare import read_manifest
from transferops.errors import RegistryError
from transferops.tracking import setup_tracking

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
MODEL_ARTIFACT = "model"  # the logged MLflow model's name inside the register run
METRICS = ("accuracy", "macro_f1", "ece")


@dataclass
class RegisterResult:
    """What `register` did."""

    name: str
    version: str
    created: bool
    run_id: str
    tags: dict[str, str]


@dataclass
class Decision:
    """What `promote` decided, and why."""

    promote: bool
    name: str
    challenger: str | None
    champion: str | None
    reasons: list[str] = field(default_factory=list)
    challenger_metric: float | None = None
    champion_metric: float | None = None
    applied: bool = False

    def summary(self) -> str:
        """One line for humans."""
        head = (
            f"promote {self.name} v{self.challenger} to {CHAMPION}"
            if self.promote
            else f"keep {self.name} {CHAMPION} "
            + (f"v{self.champion}" if self.champion else "(none)")
        )
        return f"{head}: " + "; ".join(self.reasons)


# ------------------------------------------------------------------- lineage


def git_commit(cwd: Path | str = ".") -> tuple[str, bool]:
    """(HEAD commit, whether tracked files differ from it); ("unknown", False) outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return sha, bool(dirty)


def _registered_inputs(cfg: Config) -> tuple[Path, dict, dict, dict | None]:
    """The model folder, its spec and its evaluation, checked to belong together."""
    model_dir = Path(cfg.finetune.out)
    if not (model_dir / "model.json").exists():
        raise RegistryError(f"{model_dir}/model.json not found: run `transferops train` first")
    spec = read_json(model_dir / "model.json")
    metrics_path = Path(cfg.evaluate.out) / "metrics.json"
    if not metrics_path.exists():
        raise RegistryError(f"{metrics_path} not found: run `transferops evaluate` first")
    metrics = read_json(metrics_path)
    sha = sha256_file(model_dir / "model.safetensors")
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


def trained_params(spec: dict[str, Any]) -> dict[str, Any]:
    """The finetune params a model folder was trained with, without its output paths."""
    return {k: v for k, v in spec["finetune"].items() if k not in FinetuneConfig.OUTPUT_FIELDS}


def lineage_tags(
    cfg: Config, spec: dict, metrics: dict, search: dict | None, model_sha: str
) -> dict[str, str]:
    """Tags every registered version carries (values are strings, as MLflow stores them)."""
    commit, dirty = git_commit()
    ft = metrics["finetuned"]
    models = metrics["models"]
    tags: dict[str, Any] = {
        "data_hash": spec["data_hash"],
        "source_origin": spec["source"]["origin"],
        "source_sha256": spec["source"]["sha256"],
        "git_commit": commit,
        "git_dirty": dirty,
        "model_sha256": model_sha,
        "params": json.dumps(trained_params(spec), sort_keys=True),
        "classes": json.dumps(spec["class_names"]),
        "val_accuracy": spec.get("val_accuracy"),
        "test_size": metrics["test_size"],
        "verdict": metrics["verdict"],
        "transfer_beats_scratch": metrics["transfer_beats_scratch"],
        "transfer_minus_scratch": metrics["transfer_minus_scratch"]["accuracy"]["mean"],
    }
    for m in METRICS:
        tags[f"test_{m}"] = ft[m]
        for role in ("scratch", "probe"):
            if role in models:
                tags[f"{role}_{m}"] = models[role][m]["mean"]
        if "classical" in models:
            tags[f"classical_{m}"] = models["classical"][m]
    if search is not None:
        tags |= {
            "best_trial": f"{search['study_name']}#{search['best_trial']}",
            "best_params": json.dumps(search["best_params"], sort_keys=True),
            "search_run_id": search.get("mlflow_run_id"),
        }
    return {k: _tag(v) for k, v in tags.items() if v is not None}


def _tag(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def model_card(name: str, version: str, tags: dict[str, str], spec: dict, metrics: dict) -> str:
    """The model card (markdown) logged with each version."""
    classes = json.loads(tags["classes"])
    models = metrics["models"]
    rows = [
        f"| **this model** | {float(tags['test_accuracy']):.3f} | "
        f"{float(tags['test_macro_f1']):.3f} |"
    ]
    for role in ("transfer", "scratch", "probe"):
        if role in models:
            rows.append(
                f"| {role} (mean over seeds) | {models[role]['accuracy']['mean']:.3f} | "
                f"{models[role]['macro_f1']['mean']:.3f} |"
            )
    if "classical" in models:
        c = models["classical"]
        rows.append(f"| classical | {c['accuracy']:.3f} | {c['macro_f1']:.3f} |")
    lines = [
        f"# {name} v{version}",
        "",
        f"{spec['modality'].capitalize()} classifier over {len(classes)} classes: "
        + ", ".join(f"`{c}`" for c in classes[:30])
        + (" ..." if len(classes) > 30 else "")
        + ".",
        "",
        "## Lineage",
        "",
        f"- data hash: `{tags['data_hash']}` (test split: {tags['test_size']} examples)",
        f"- source model: {tags['source_origin']} (sha256 `{tags['source_sha256'][:16]}`)",
        f"- code: git `{tags['git_commit'][:12]}`"
        + (" with uncommitted changes" if tags["git_dirty"] == "true" else ""),
        f"- weights sha256: `{tags['model_sha256'][:16]}`",
    ]
    if "best_trial" in tags:
        lines.append(f"- search: best trial {tags['best_trial']}, params {tags['best_params']}")
    lines += [
        f"- fine-tuning params: `{tags['params']}`",
        "",
        "## Test results",
        "",
        f"**{metrics['verdict']}**",
        "",
        "| model | accuracy | macro-F1 |",
        "| --- | --- | --- |",
        *rows,
        "",
        "## Use",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{name}@{CHAMPION}")',
        (
            'model.predict(pd.DataFrame({"image": [open("x.png", "rb").read()]}))'
            if spec["modality"] == "image"
            else 'model.predict(pd.DataFrame({"text": ["some text"]}))'
        ),
        "```",
        "",
        "Inputs are "
        + (
            f"image bytes or paths, decoded and fitted to {spec.get('image_size')} px "
            f"({spec.get('image_resize', 'crop')}) like the training data."
            if spec["modality"] == "image"
            else f"texts, truncated to {spec.get('max_length')} tokens."
        ),
        "",
        "## Limits",
        "",
        "Scored on one held-out test split of the data above; expect lower accuracy on data "
        "that differs from it.",
    ]
    if "classical" in models and models["classical"]["accuracy"] > float(tags["test_accuracy"]):
        lines.append(
            "The classical baseline scores higher than this model on the test split: prefer it "
            "unless the transfer model is needed for another reason."
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ register


def _signature_and_example(spec: dict, model_dir: Path, cfg: Config) -> tuple[Any, Any]:
    import io

    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from transferops.data.prepare import load_prepared

    outputs = Schema([ColSpec("string", "label"), ColSpec("double", "confidence")])
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


def _requirements(spec: dict[str, Any]) -> list[str]:
    """Pinned pip requirements of the pyfunc (explicit: skips MLflow's slow inference).

    transferops itself is not among them: its code ships inside the model (``code_paths``),
    so the model loads where transferops is not installed.
    """
    from importlib.metadata import version

    pkgs = ["torch", "mlflow", "pandas", "numpy", "pillow", "safetensors", "pydantic"]
    pkgs += ["pyyaml", "rich"]  # imported by the shipped transferops modules
    family = spec["source"]["family"]
    if spec["modality"] == "text":
        pkgs.append("transformers")
    elif family == "efficientnet_lite":
        pkgs.append("efficientnet-lite-pytorch")
    else:
        pkgs.append("torchvision")
    return [f"{p}=={version(p)}" for p in pkgs]


def find_version(client: Any, name: str, model_sha: str) -> Any | None:
    """The version of `name` holding these exact weights, if registered already."""
    found = client.search_model_versions(f"name='{name}' and tags.model_sha256='{model_sha}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register(cfg: Config) -> RegisterResult:
    """Register finetune.out (evaluated) as a new version with alias `challenger`."""
    from mlflow import MlflowClient

    model_dir, spec, metrics, search = _registered_inputs(cfg)
    model_sha = metrics["finetuned"]["model_sha256"]
    name = cfg.registry.model_name
    mlflow = setup_tracking(cfg.tracking)
    client = MlflowClient()
    existing = find_version(client, name, model_sha)
    if existing is not None:
        client.set_registered_model_alias(name, CHALLENGER, existing.version)
        log.info("%s v%s already holds these weights: not registered again", name, existing.version)
        res = RegisterResult(name, str(existing.version), False, existing.run_id, existing.tags)
        _write_receipt(cfg, res)
        return res

    import transferops
    from transferops import _pyfunc_entry

    tags = lineage_tags(cfg, spec, metrics, search, model_sha)
    signature, example = _signature_and_example(spec, model_dir, cfg)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(
            name, description="Fine-tuned by transferops; see each version's model card."
        )
    run_tags = {"role": "registered-model", **{k: tags[k] for k in ("data_hash", "model_sha256")}}
    with mlflow.start_run(run_name=f"register-{name}", tags=run_tags) as run:
        mlflow.log_params(trained_params(spec))
        mlflow.log_metrics({f"test_{m}": metrics["finetuned"][m] for m in METRICS})
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=_pyfunc_entry.__file__,  # models from code: nothing pickled
            artifacts={"model": str(model_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=_requirements(spec),
            code_paths=[str(Path(transferops.__file__).parent)],
            metadata={"class_names": spec["class_names"], "modality": spec["modality"]},
        )
        mv = client.create_model_version(
            name, info.model_uri, run_id=run.info.run_id, tags=tags, model_id=info.model_id
        )
        card = model_card(name, str(mv.version), tags, spec, metrics)
        mlflow.log_text(card, "model_card.md")
    client.update_model_version(name, mv.version, description=card)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    log.info("registered %s v%s (alias %s)", name, mv.version, CHALLENGER)
    res = RegisterResult(name, str(mv.version), True, run.info.run_id, tags)
    _write_receipt(cfg, res)
    return res


def _write_receipt(cfg: Config, res: RegisterResult) -> None:
    """registry.out: which version holds which weights (DVC's output of `register`)."""
    write_json_atomic(
        Path(cfg.registry.out),
        {
            "model_name": res.name,
            "version": res.version,
            "alias": CHALLENGER,
            "model_sha256": res.tags.get("model_sha256"),
            "data_hash": res.tags.get("data_hash"),
            "mlflow_run_id": res.run_id,
            "tracking_uri": cfg.tracking.uri,
        },
    )


# ------------------------------------------------------------------- promote


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_model_folder(
    name: str, version: str | int, dst: Path | str, registry_uri: str | None = None
) -> Path | None:
    """Download a registered version into `dst`; the transferops model folder inside it
    (the pyfunc's ``model`` artifact, see :func:`register`), or None if it has none.

    `registry_uri` None: the registry MLflow is set up for (:func:`setup_tracking`).
    """
    import mlflow
    import yaml
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    where = client.get_model_version_download_uri(name, str(version))
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=where, dst_path=str(dst), tracking_uri=registry_uri
        )
    )
    if not (local / "MLmodel").exists():
        return None
    flavors = yaml.safe_load((local / "MLmodel").read_text()).get("flavors", {})
    rel = flavors.get("python_function", {}).get("artifacts", {}).get("model", {}).get("path")
    folder = local / rel if rel else None
    return folder if folder is not None and (folder / "model.json").exists() else None


def _champion_metric(
    cfg: Config, champion: Any, challenger: Any, metric: str
) -> tuple[float | None, str]:
    """The champion's test metric on the challenger's test split, and how it was obtained."""
    if champion.tags.get("data_hash") == challenger.tags.get("data_hash"):
        return float(champion.tags[f"test_{metric}"]), "on the same test split"
    # Other data: score the champion on the current test split (the challenger's).
    current = read_manifest(cfg.data.out)["data_hash"]
    if current != challenger.tags.get("data_hash"):
        raise RegistryError(
            f"{cfg.data.out} (data {current[:12]}) is neither the challenger's data nor the "
            "champion's: run the pipeline on the current data before promoting"
        )
    if json.loads(champion.tags.get("classes", "[]")) != json.loads(challenger.tags["classes"]):
        return None, "champion was trained on other classes and cannot be scored on this split"
    import tempfile

    from transferops.evaluate import score_model_dir

    with tempfile.TemporaryDirectory(prefix="transferops-champion-") as dl:
        folder = download_model_folder(champion.name, champion.version, dl)
        if folder is None:
            raise RegistryError(
                f"{champion.name} v{champion.version} (the champion) holds no transferops model "
                "folder, so it cannot be re-scored on the new test split: move the alias by hand"
            )
        scored = score_model_dir(folder, cfg)
    return scored[metric], f"re-scored on the new test split (data {current[:12]})"


def decide(cfg: Config) -> Decision:
    """The promotion decision for the current challenger (changes nothing)."""
    from mlflow import MlflowClient

    rc = cfg.registry
    setup_tracking(cfg.tracking)
    client = MlflowClient()
    name, metric = rc.model_name, rc.metric
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"{name} has no @{CHALLENGER} version: run `transferops register` first"
        )
    champion = _alias(client, name, CHAMPION)
    d = Decision(
        False,
        name,
        str(challenger.version),
        str(champion.version) if champion else None,
        challenger_metric=float(challenger.tags[f"test_{metric}"]),
    )
    if champion is not None and champion.version == challenger.version:
        d.reasons.append(f"v{challenger.version} is already the {CHAMPION}")
        return d
    # Gate 1: the from-scratch baseline.
    if rc.baseline_gate == "significant":
        beats = challenger.tags.get("transfer_beats_scratch") == "true"
        d.reasons.append(
            ("passes" if beats else "fails")
            + f" the baseline gate ({challenger.tags.get('verdict')})"
        )
    else:
        scratch = float(challenger.tags.get(f"scratch_{metric}", "nan"))
        beats = d.challenger_metric > scratch
        d.reasons.append(
            ("passes" if beats else "fails")
            + f" the baseline gate (test {metric} {d.challenger_metric:.4f} vs scratch mean "
            f"{scratch:.4f})"
        )
    # Gate 2: the current champion.
    if champion is None:
        d.reasons.append("no champion yet (first model)")
        d.promote = beats
        return d
    d.champion_metric, how = _champion_metric(cfg, champion, challenger, metric)
    if d.champion_metric is None:
        d.reasons.append(f"v{champion.version}: {how}; the challenger replaces it")
        d.promote = beats
        return d
    gain = d.challenger_metric - d.champion_metric
    wins = gain > 0 and gain >= rc.min_improvement
    d.reasons.append(
        ("beats" if wins else "does not beat")
        + f" {CHAMPION} v{champion.version}: test {metric} {d.challenger_metric:.4f} vs "
        f"{d.champion_metric:.4f} ({how}; gain {gain:+.4f}, needed > 0 and >= "
        f"{rc.min_improvement})"
    )
    d.promote = beats and wins
    return d


def promote(cfg: Config, dry_run: bool = False) -> Decision:
    """Move `champion` to the challenger if both gates pass; `dry_run` only decides."""
    from mlflow import MlflowClient

    d = decide(cfg)
    if d.promote and not dry_run:
        client = MlflowClient()
        assert d.challenger is not None
        client.set_registered_model_alias(d.name, CHAMPION, d.challenger)
        if d.champion is not None:
            client.set_model_version_tag(d.name, d.challenger, "replaced_champion", d.champion)
        d.applied = True
    log.info("%s%s", "(dry run) " if dry_run else "", d.summary())
    return d
