"""`transferops evaluate`: the only place the test split is read.

For every run `baseline` trained (transfer / scratch / probe over seeds, few-shot curve
models) and a classical baseline fitted here on the train split: accuracy, macro-F1,
per-class precision/recall, confusion matrix, calibration (ECE). Over seeds: the mean with a
t confidence interval. Transfer - scratch (and - probe) is decided by a paired bootstrap over
the test examples (each role's correctness averaged over its seeds; `evaluation.stats`), with
the paired-by-seed t-interval reported beside it. The model `train` wrote (the one `register`
registers) is compared the same way with every baseline: what the promotion gates read.
Writes ``evaluate.out/``: ``metrics.json`` (everything), ``summary.json`` (DVC metrics),
``evaluation.md`` (read this first) and ``evaluation.html`` (the same, plots inlined),
``efficiency.csv`` / ``learning_curves.csv`` (DVC plots) and PNG plots, and logs test metrics
into each run's MLflow run.

metrics.json keys: ``test_size``, ``confidence``, ``models.<role>.<metric>.{mean, ci_low,
ci_high, n}`` for role in transfer/scratch/probe (metric: accuracy, macro_f1, ece) and
``models.classical.<metric>``, ``transfer_minus_scratch.accuracy.{mean, ci_low, ci_high, n,
over_seeds}`` (bootstrap interval; ``n`` test examples), ``transfer_minus_probe.accuracy...``,
``transfer_beats_scratch`` (bool), ``verdict`` (str), ``efficiency`` (list of {per_class,
transfer, scratch}), ``data_hash``, and ``finetuned.{accuracy, macro_f1, ece, model_sha256,
dir, minus.<role>}``: the model `register` registers, with its paired accuracy difference
to each baseline. Per-class precision and recall (``<role>.<class>.{precision, recall}``,
first seed) are in ``per_class.json``, so ``dvc metrics show`` stays a summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from transferops.config import Config
from transferops.data.prepared import PreparedData, load_prepared, read_manifest
from transferops.errors import DataError
from transferops.evaluation.report import (
    recipe_below,
    report_html,
    report_markdown,
    worse_than,
    write_plots,
)
from transferops.evaluation.stats import (
    SCORES,
    bootstrap_ci,
    ece,
    mean_ci,
    paired_bootstrap,
    verdict,
)
from transferops.finetune.classical import fit_classical
from transferops.finetune.selection import balanced_accuracy, macro_f1
from transferops.model.calibration import nll, scaled
from transferops.model.folder import SPEC_FILE, WEIGHTS_FILE
from transferops.model.inputs import pick_device
from transferops.model.predict import predict_split
from transferops.runtime.artifacts import atomic_dir, read_json, sha256_file, write_json_atomic
from transferops.runtime.tracking import log_data, setup_tracking, start_run

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- scores


def classification_metrics(
    probs: np.ndarray, y: np.ndarray, class_names: list[str], bins: int
) -> dict[str, Any]:
    """Accuracy, balanced accuracy (the mean recall over the classes in `y`), macro-F1, ECE,
    per-class precision/recall, confusion matrix."""
    pred = probs.argmax(1)
    labels = list(range(len(class_names)))
    p, r, _, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": balanced_accuracy(y, pred, len(labels)),
        "macro_f1": macro_f1(y, pred, len(labels)),
        "ece": ece(probs, y, bins),
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i])} for i, c in enumerate(class_names)
        },
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
    }


# ------------------------------------------------------------------- predicting


def predict(model_dir: Path, data: PreparedData, device: torch.device) -> np.ndarray:
    """Class probabilities of a saved model on a prepared split."""
    trained_on = read_json(model_dir / SPEC_FILE)["class_names"]
    if trained_on != data.class_names:
        raise DataError(
            f"{model_dir} was trained on classes {trained_on}, the test "
            f"split has {data.class_names}: re-run `transferops baseline`"
        )
    return predict_split(model_dir, data, device)


# ---------------------------------------------------------------------- public


def evaluate(cfg: Config) -> dict[str, Any]:
    """Score every baseline run on the test split and write the report."""
    ec = cfg.evaluate
    index, manifest = _baseline_index(cfg)
    test = load_prepared(cfg.data.out, "test")
    device = pick_device(cfg.finetune.device)
    per_run = _score_runs(index["runs"], test, device, ec.ece_bins)
    main = [r for r in per_run.values() if r["per_class"] is None]
    models, correct = _by_role(main, ec.confidence)
    classical_name = None
    if cfg.baseline.classical:
        classical_name, models["classical"], correct["classical"] = _classical_reference(cfg, test)
    diffs = {
        other: _transfer_minus(main, correct, other, ec.confidence)
        for other in ("scratch", "probe")
        if other in correct
    }
    line = verdict(diffs["scratch"])
    first = {r["role"]: r for r in main if r["seed"] == index["seeds"][0]}
    efficiency = _efficiency(per_run, first, cfg.baseline.efficiency_per_class, ec.confidence)
    metrics = {
        "test_size": len(test),
        "confidence": ec.confidence,
        "models": models,
        "transfer_minus_scratch": {"accuracy": diffs["scratch"]},
        **({"transfer_minus_probe": {"accuracy": diffs["probe"]}} if "probe" in diffs else {}),
        "transfer_beats_scratch": diffs["scratch"]["ci_low"] > 0,
        "verdict": line,
        "efficiency": efficiency,
        "tuning": _tuning(cfg, main),
        "data_hash": manifest["data_hash"],
        "data": _data_facts(cfg, manifest),
        **_source_ranking(cfg),
    }
    finetuned = _score_finetuned(
        cfg, test, device, manifest["data_hash"], correct, _reference_recall(main)
    )
    if finetuned is not None:
        metrics["finetuned"] = finetuned
    for other, d in recipe_below(metrics).items():
        log.warning(
            "transfer − %s on test: %+.1f points [%+.1f, %+.1f]: %s",
            other,
            100 * d["mean"],
            100 * d["ci_low"],
            100 * d["ci_high"],
            worse_than(other).replace("**", ""),
        )
    _write_report(Path(ec.out), metrics, first, efficiency, test.class_names, classical_name)
    _log_to_mlflow(cfg, per_run, metrics, Path(ec.out))
    log.info("%s", line)
    return metrics


def _baseline_index(cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """The baseline runs' index and the prepared data's manifest, checked to belong together."""
    index_path = cfg.baseline.index
    if not index_path.exists():
        raise DataError(f"{index_path} not found: run `transferops baseline` first")
    index = read_json(index_path)
    manifest = read_manifest(cfg.data.out)
    if index["data_hash"] != manifest["data_hash"]:
        raise DataError(
            f"{index_path} was trained on data {index['data_hash'][:12]}, but "
            f"{cfg.data.out} is now {manifest['data_hash'][:12]}: re-run `transferops baseline`"
        )
    return index, manifest


def _score_runs(
    runs: list[dict[str, Any]], test: PreparedData, device: torch.device, ece_bins: int
) -> dict[str, dict[str, Any]]:
    """Each baseline run's test metrics and per-example correctness, by run name."""
    y = test.labels.numpy()
    per_run = {}
    for e in runs:
        probs = predict(Path(e["dir"]), test, device)
        per_run[e["name"]] = e | {
            "metrics": classification_metrics(probs, y, test.class_names, ece_bins),
            "correct": probs.argmax(1) == y,
        }
    return per_run


def _by_role(
    main: list[dict[str, Any]], confidence: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per role: metrics over its seeds (mean and interval), and each test example's
    correctness averaged over the seeds (what the paired comparisons read)."""
    models: dict[str, Any] = {}
    correct: dict[str, np.ndarray] = {}
    for role in ("transfer", "scratch", "probe"):
        runs = sorted((r for r in main if r["role"] == role), key=lambda r: r["seed"])
        if runs:
            models[role] = {
                m: mean_ci([r["metrics"][m] for r in runs], confidence, (0, 1)) for m in SCORES
            }
            if role == "transfer":  # seeds where fine-tuning never beat the probe beyond noise
                models[role]["at_probe"] = sum(r.get("candidate") == "probe" for r in runs)
            correct[role] = np.mean([r["correct"] for r in runs], axis=0)
    return models, correct


def _classical_reference(
    cfg: Config, test: PreparedData
) -> tuple[str, dict[str, float], np.ndarray]:
    """The classical model (fitted once per run on train, see finetune.classical): its name,
    test metrics and per-example correctness."""
    fit = fit_classical(load_prepared(cfg.data.out, "train"))
    probs, y = fit.probs(test), test.labels.numpy()
    m = classification_metrics(probs, y, test.class_names, cfg.evaluate.ece_bins)
    return fit.name, {k: m[k] for k in SCORES}, probs.argmax(1) == y


def _write_report(
    out: Path,
    metrics: dict[str, Any],
    first: dict[str, dict[str, Any]],
    efficiency: dict[str, Any],
    class_names: list[str],
    classical_name: str | None,
) -> None:
    """metrics.json, the dvc summary, per-class metrics, plots and the report, atomically."""
    per_class = {role: r["metrics"]["per_class"] for role, r in first.items()}
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "summary.json", dvc_summary(metrics))
        write_json_atomic(tmp / "per_class.json", per_class)
        write_plots(tmp, first, efficiency, class_names, metrics["models"])
        md = report_markdown(metrics, per_class, classical_name)
        (tmp / "evaluation.md").write_text(md)
        (tmp / "evaluation.html").write_text(report_html(md, tmp))


def dvc_summary(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The few numbers `dvc metrics show` / `diff` compare (metrics.json has them all)."""
    m, d = metrics["models"], metrics["transfer_minus_scratch"]["accuracy"]
    out: dict[str, float | int] = {"test_size": metrics["test_size"]}
    if "finetuned" in metrics:
        out["registered_accuracy"] = metrics["finetuned"]["accuracy"]
    for role in ("transfer", "scratch", "probe"):
        if role in m:
            out[f"{role}_accuracy"] = m[role]["accuracy"]["mean"]
    if "classical" in m:
        out["classical_accuracy"] = m["classical"]["accuracy"]
    out |= {f"transfer_minus_scratch_{k}": d[k] for k in ("mean", "ci_low", "ci_high")}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _transfer_minus(
    main: list[dict], correct: dict[str, np.ndarray], other: str, confidence: float
) -> dict[str, Any]:
    """Transfer - `other` test accuracy: a paired bootstrap over test examples (the decision),
    with the paired-by-seed t-interval beside it (``over_seeds``: how much seeds move it)."""
    diff = paired_bootstrap(correct["transfer"], correct[other], confidence)
    a = {r["seed"]: r["metrics"]["accuracy"] for r in main if r["role"] == "transfer"}
    b = {r["seed"]: r["metrics"]["accuracy"] for r in main if r["role"] == other}
    per_seed = [a[s] - b[s] for s in sorted(set(a) & set(b))]
    # with 2-3 seeds a t-interval is wide by construction: each seed's difference says more
    return diff | {"over_seeds": mean_ci(per_seed, confidence, (-1, 1)) | {"per_seed": per_seed}}


def _reference_recall(main: list[dict[str, Any]]) -> tuple[str, dict[str, float]] | None:
    """Per-class test recall of the exact probe (mean over its seeds), else of the transfer
    runs: what a class the registered model never gets right is compared with."""
    for role in ("probe", "transfer"):
        runs = [r for r in main if r["role"] == role]
        if runs:
            names = runs[0]["metrics"]["per_class"]
            return role, {
                c: float(np.mean([r["metrics"]["per_class"][c]["recall"] for r in runs]))
                for c in names
            }
    return None


def dropped_classes(
    per_class: dict[str, dict[str, float]], reference: tuple[str, dict[str, float]] | None
) -> list[str]:
    """Classes the model never predicts right on test (recall 0) although the reference
    recognises some of their examples."""
    if reference is None:
        return []
    _, recall = reference
    return [c for c, m in per_class.items() if m["recall"] == 0 and recall.get(c, 0) > 0]


def _source_ranking(cfg: Config) -> dict[str, Any]:
    """``source_ranking``: how the pulled source was chosen from ``source.candidates`` (the
    exact probe of each on val, :mod:`transferops.search.sources`), when it was."""
    path = Path(cfg.source.out) / "manifest.json"
    ranking = read_json(path).get("ranking") if path.exists() else None
    if not ranking:
        return {}
    return {"source_ranking": {k: v for k, v in ranking.items() if k != "key"}}


def _score_finetuned(
    cfg: Config,
    test: PreparedData,
    device: torch.device,
    data_hash: str,
    baselines: dict[str, np.ndarray],
    reference: tuple[str, dict[str, float]] | None = None,
) -> dict[str, Any] | None:
    """Test metrics of the model `train` wrote (the one `register` will register), its
    paired accuracy difference to each baseline (``minus.<role>``: what the gates read) and
    the classes it drops (recall 0 where `reference` has some)."""
    model_dir = Path(cfg.finetune.out)
    if not (model_dir / SPEC_FILE).exists():
        log.warning(
            "%s not found: run `transferops train` to score the model to register", model_dir
        )
        return None
    spec = read_json(model_dir / SPEC_FILE)
    if spec["data_hash"] != data_hash:
        log.warning("%s was trained on other data: re-run `transferops train`", model_dir)
        return None
    probs = predict(model_dir, test, device)
    y = test.labels.numpy()
    m = classification_metrics(probs, y, test.class_names, cfg.evaluate.ece_bins)
    conf = cfg.evaluate.confidence
    dropped = dropped_classes(m["per_class"], reference)
    if dropped:
        log.warning(
            "the model to register never gets class(es) %s right on test (recall 0), where "
            "the %s recognises some: promotion refuses it (registry.dropped_class_gate)",
            ", ".join(dropped),
            reference[0] if reference else "?",
        )
    return {k: m[k] for k in SCORES} | {
        "calibration": _calibration(probs, y, float(spec.get("temperature", 1.0)), cfg),
        "dropped_classes": dropped,
        "min_class_recall": min(v["recall"] for v in m["per_class"].values()),
        "model_sha256": sha256_file(model_dir / WEIGHTS_FILE),
        "dir": str(model_dir),
        # "classical" when fine-tuning did not beat the classical model on val (train.py)
        "candidate": spec.get("candidate", "finetuned"),
        "members": [  # an ensemble's (finetune.ensemble, finetune.ensemble_trials)
            {
                "trial": m.get("trial"),
                **{k: m["finetune"][k] for k in ("lr", "unfreeze_depth", "seed")},
                "val_accuracy": m["val_accuracy"],
                "candidate": m.get("candidate", "finetuned"),
            }
            for m in spec.get("members") or []
        ],
        "minus": {
            role: paired_bootstrap(probs.argmax(1) == y, c, conf) for role, c in baselines.items()
        },
    }


def _calibration(probs: np.ndarray, y: np.ndarray, t: float, cfg: Config) -> dict[str, float]:
    """The registered model's calibration on test: its temperature (fitted on val) and NLL /
    ECE without it and with it (`probs` are the calibrated ones)."""
    raw = scaled(probs, 1.0 / t) if t != 1.0 else probs
    bins = cfg.evaluate.ece_bins
    return {
        "temperature": round(t, 4),
        "test_nll_before": round(nll(raw, y), 4),
        "test_nll_after": round(nll(probs, y), 4),
        "test_ece_before": round(ece(raw, y, bins), 4),
        "test_ece_after": round(ece(probs, y, bins), 4),
    }


def score_model_dir(model_dir: Path, cfg: Config) -> dict[str, float]:
    """Test metrics of any saved model folder on the current test split (e.g. a champion
    trained on older data, re-scored by `promote`)."""
    test = load_prepared(cfg.data.out, "test")
    m = classification_metrics(
        predict(model_dir, test, pick_device(cfg.finetune.device)),
        test.labels.numpy(),
        test.class_names,
        cfg.evaluate.ece_bins,
    )
    return {k: m[k] for k in SCORES}


def _data_facts(cfg: Config, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the report names the data by (besides its hash)."""
    return {
        "path": str(cfg.data.path),
        "counts": {s: sum(c.values()) for s, c in manifest["counts"].items()},
        "image_size": manifest.get("image_size"),
        "limit_per_class": cfg.data.limit_per_class,
        # what prepare found and left as it is, or left out (warned there too)
        "left_out_classes": manifest.get("left_out_classes") or {},
        "duplicates_across_splits": manifest.get("duplicates_across_splits", 0),
        "conflicting_labels": manifest.get("conflicting_labels", 0),
    }


def _efficiency(
    per_run: dict, first: dict, ks: list[int | None], confidence: float
) -> list[dict[str, Any]]:
    """Transfer and scratch (first seed) at each training size, each with a bootstrap
    interval over the test examples (one run per point: no seed interval exists)."""
    rows = []
    for k in ks:
        pts: dict[str, Any] = {}
        for role in ("transfer", "scratch"):
            r = first.get(role) if k is None else per_run.get(f"{role}-k{k}")
            if r is not None:
                ci = bootstrap_ci(r["correct"], confidence)
                pts |= {role: r["metrics"]["accuracy"], f"{role}_ci": [ci["ci_low"], ci["ci_high"]]}
        if "transfer" in pts and "scratch" in pts:
            rows.append({"per_class": k if k is not None else "all", **pts})
    return rows


def _tuning(cfg: Config, main: list[dict[str, Any]]) -> dict[str, Any]:
    """How much tuning each arm got (its search's trials and best params), and in how many
    seeds scratch was still improving when its epochs ran out: a skeptic's questions."""
    out: dict[str, Any] = {}
    for arm, folder in (("transfer", cfg.search.out), ("scratch", cfg.baseline.scratch_search)):
        summary = Path(folder) / "summary.json"
        if summary.exists():
            s = read_json(summary)
            out[arm] = {
                "trials": s["counts"],
                "best_params": s["best_params"],
                "within_noise": s.get("within_noise"),  # summaries before it lack it
            }
    scratch = [r for r in main if r["role"] == "scratch"]
    rising = 0
    for r in scratch:
        val = [h["val_accuracy"] for h in read_json(Path(r["dir"]) / "history.json")]
        rising += bool(val) and val[-1] >= max(val)  # its best epoch was its last
    out.setdefault("scratch", {})["still_improving"] = [rising, len(scratch)]
    return out


def _log_to_mlflow(cfg: Config, per_run: dict, metrics: dict, out: Path) -> None:
    mlflow = setup_tracking(cfg.tracking)
    from mlflow.entities import Metric  # MLflow is imported only where it is used

    client = mlflow.MlflowClient()
    for r in per_run.values():  # logged without reopening the run: its duration stays true
        client.log_batch(
            r["mlflow_run_id"],
            metrics=[
                Metric(f"test_{k}", r["metrics"][k], int(time.time() * 1000), 0) for k in SCORES
            ],
        )
    with start_run(
        mlflow,
        run_name="evaluation",
        tags={"role": "evaluation", "data_hash": metrics["data_hash"]},
    ):
        name = Path(cfg.data.path).name
        log_data(mlflow, cfg.data.out, name, metrics["data_hash"], "test")
        flat = {
            f"{role}_{m}": v["mean"] if isinstance(v, dict) else v
            for role, ms in metrics["models"].items()
            for m, v in ms.items()
        }
        mlflow.log_metrics(
            flat | {"transfer_minus_scratch": metrics["transfer_minus_scratch"]["accuracy"]["mean"]}
        )
        mlflow.set_tag("verdict", metrics["verdict"])
        mlflow.log_artifacts(str(out))
