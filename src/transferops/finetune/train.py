"""`transferops train`: config -> fine-tuned model folder.

``train_from_config`` is what the CLI, DVC and Prefect call. It validates the configuration
against the prepared data and the pulled source *before* any training, reads only the train
and val splits, and writes ``finetune.out/`` (a model folder, see :mod:`transferops.model.folder`)
and ``finetune.metrics`` (JSON) for DVC.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferops.config import Config, FinetuneConfig, check_depth, with_overrides
from transferops.data.prepared import load_prepared, read_manifest
from transferops.errors import ConfigError
from transferops.finetune.adapters import ADAPTER_FILE, adapter_weights, add_lora, merge_adapters
from transferops.finetune.calibrate import calibrate
from transferops.finetune.classical import fit_classical, pixel_net, pixel_source, val_score
from transferops.finetune.engine import EpochHook, TrainResult, finetune
from transferops.finetune.selection import ValProbs, greedy_join, metric_value
from transferops.finetune.thaw import block_lr_scale
from transferops.model.blocks import Ensemble, StagedNet
from transferops.model.calibration import nll
from transferops.model.families import build_staged, family, runs_bf16
from transferops.model.folder import (
    SPEC_FILE,
    load_finetuned,
    member_spec,
    save_member,
    save_model_folder,
)
from transferops.model.inputs import input_side, make_inputs, make_preprocess, pick_device
from transferops.runtime.artifacts import (
    atomic_dir,
    copy_folder,
    read_json,
    sha256_json,
    write_json_atomic,
)
from transferops.runtime.tracking import log_data, log_epoch, log_outcome, setup_tracking, start_run
from transferops.sources.manifest import read_source_manifest, source_id
from transferops.sources.pull import SourceModel, load_source, random_init

log = logging.getLogger(__name__)

BEST_MODEL = "best_model"  # in search.out: the best trial's model, for `train` to reuse
RUNNERS_UP = "runners_up"  # in search.out: the next-best trials' models, ensemble members


def build_net(
    source: SourceModel, num_classes: int, cfg: FinetuneConfig, image_size: int = 32
) -> StagedNet:
    """The source model as blocks + a new head (head init seeded by finetune.seed), with
    LoRA adapters injected first when finetune.adapter is lora."""
    torch.manual_seed(cfg.seed)
    model = add_lora(source.model, cfg, source.family) if cfg.adapter == "lora" else source.model
    return build_staged(
        model,
        source.family,
        num_classes,
        dropout=cfg.dropout,
        image_size=image_size,
        user_blocks=source.manifest.get("user_blocks"),
    )


def check_trainable(cfg: Config, data_manifest: dict, source_manifest: dict) -> None:
    """Refuse, before any run opens, a depth the source lacks or a source of the wrong
    modality for the data."""
    check_depth(cfg, source_manifest["num_blocks"], search=False)
    kind, modality = source_manifest["input"]["type"], data_manifest["modality"]
    if kind != modality:
        raise ConfigError(
            f"source ({source_manifest['origin']}) takes {kind} input but the prepared data is "
            f"{modality}: choose a {modality} source in params.yaml `source:`"
        )


def train_model(
    cfg: Config,
    on_epoch_end: EpochHook | None = None,
    checkpoint: Path | None = None,
    feature_store: dict[tuple, torch.Tensor] | None = None,
) -> tuple[TrainResult, dict[str, Any]]:
    """Fine-tune per `cfg` on train, score on val (never test). Returns (result, spec).

    ``finetune.init: random`` trains the same architecture from a random init (seeded by
    finetune.seed): the from-scratch baseline.
    """
    data_manifest = read_manifest(cfg.data.out)
    image_size = data_manifest.get("image_size") or None
    source = load_source(cfg.source.out, image_size)  # verifies the weights' sha256
    if cfg.finetune.init == "random":
        torch.manual_seed(cfg.finetune.seed)
        source = random_init(source, image_size)
    check_trainable(cfg, data_manifest, source.manifest)
    device = pick_device(cfg.finetune.device)
    train = load_prepared(cfg.data.out, "train")
    val = load_prepared(cfg.data.out, "val")
    net = build_net(
        source, len(train.class_names), cfg.finetune, input_side(source.manifest, image_size) or 32
    )
    pre = make_preprocess(
        source.manifest, device, train.modality, cfg.finetune.augment, cfg.finetune.precision
    )
    if pre.bf16 and device.type == "cpu":
        _say_bf16_on_cpu(cfg.finetune.precision)
    spec = {
        "format_version": 1,
        "source": source.manifest,
        "class_names": train.class_names,
        "modality": train.modality,
        "image_size": data_manifest.get("image_size"),
        # how raw images were fitted to image_size (the registered model does the same)
        "image_resize": (data_manifest.get("params", {}).get("image") or {}).get("resize", "crop"),
        "input": source.manifest["input"],
        "max_length": cfg.finetune.max_length,
        "finetune": cfg.finetune.model_dump(mode="json"),
        "block_lr_scale": block_lr_scale(cfg.finetune, source.family),  # what auto resolved to
        # what finetune.precision resolved to on this machine (auto differs by device/CPU):
        # the rule make_preprocess applied (pre.bf16), named as reuse compares it
        "precision": precision_here(cfg.finetune, source.manifest),
        "data_hash": data_manifest["data_hash"],
    }
    fingerprint = run_fingerprint(spec, cfg.finetune)
    res = finetune(
        net,
        make_inputs(train, cfg.source.out, source.manifest, cfg.finetune.max_length),
        make_inputs(val, cfg.source.out, source.manifest, cfg.finetune.max_length),
        cfg.finetune,
        pre,
        device,
        on_epoch_end=on_epoch_end,
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        feature_store=feature_store,
    )
    spec["val_accuracy"] = res.best_val_accuracy
    spec["val_loss"] = res.best_val_loss
    spec["weight_average"] = asdict(res.average) if res.average else None
    spec["candidate"] = "probe" if res.from_probe else "finetuned"
    return res, spec


def run_fingerprint(spec: dict[str, Any], cfg: FinetuneConfig) -> str:
    """What determines a run's training trajectory (output paths do not): a checkpoint resumes
    only a run with the same fingerprint. The precision the run resolved to is in it, not only
    the setting: ``auto`` trains in bf16 on one CPU and in fp32 on another, and a checkpoint
    must not carry a bf16 run on in fp32 (or back)."""
    return sha256_json(
        {
            "source": source_id(spec["source"]),
            "data_hash": spec["data_hash"],
            "finetune": cfg.trajectory_params(),
            "precision": spec["precision"],
        }
    )


@functools.cache
def _say_bf16_on_cpu(precision: str) -> None:
    """Once per process: that training autocasts to bf16 on this CPU (the same params give
    float32 numbers on a CPU without native bf16)."""
    log.info(
        "finetune.precision %s: bf16 autocast on this CPU (native bf16); weights and serving stay "
        "float32 (finetune.precision: fp32 gives the same numbers on every CPU)",
        precision,
    )


def save_finetuned(res: TrainResult, spec: dict[str, Any], out: Path, source_dir: Path) -> None:
    """Write a trained model's folder (weights, spec, history) atomically; LoRA adapters are
    saved alone and merged into the weights (see finetune/adapters.py)."""
    extra = {}
    if spec["finetune"].get("adapter") == "lora":
        extra[ADAPTER_FILE] = adapter_weights(res.net)
        merge_adapters(res.net)
    save_model_folder(res.net, spec, res.history, out, source_dir, extra)


# What the model `train` writes is, when it is not a fine-tuned network (spec "candidate"):
# said in the report, the model card and the summary.
CANDIDATE_NOTES = {
    "probe": "the exact linear probe on the frozen source: no epoch of fine-tuning beat it on "
    "val by more than the val split's noise (finetune.beat_probe_by)",
    "classical": "the classical model, not a fine-tuned network: fine-tuning did not beat it "
    "on val (registry.classical_candidate)",
    "ensemble": "an ensemble of fine-tuning runs: the best configuration's seeds (finetune."
    "ensemble) and the search's next-best trials (finetune.ensemble_trials); it predicts the "
    "average of their probabilities, so no one run's luck is the model",
}


def candidate_note(candidate: str, members: list[dict[str, Any]] | None = None) -> str | None:
    """What the model to register is, in words, when not one fine-tuned network (None
    then); an ensemble's members with their configurations and val accuracies."""
    note = CANDIDATE_NOTES.get(candidate)
    if note and members:
        note += "; members: " + "; ".join(member_label(m) for m in members)
    return note


def member_label(m: dict[str, Any]) -> str:
    """One ensemble member in words: the search trial it is (if one), its lr, depth and seed,
    its val accuracy. Reads a member spec's `finetune` or evaluate's flat record."""
    ft = m.get("finetune") or m
    parts = [f"trial #{m['trial']}" if m.get("trial") is not None else None]
    parts += [f"lr {ft['lr']:.2g}" if "lr" in ft else None]  # not in records from before
    parts += [f"depth {ft['unfreeze_depth']}" if "unfreeze_depth" in ft else None]
    parts += [f"seed {ft['seed']}"]
    probe = ", the exact probe" if m.get("candidate") == "probe" else ""
    return ", ".join(p for p in parts if p) + f" (val {m['val_accuracy']:.3f}{probe})"


# What an ensemble's spec keeps of each member (the rest is the ensemble's own)
MEMBER_KEYS = ("finetune", "val_accuracy", "val_loss", "weight_average", "candidate", "trial")


@dataclass(frozen=True)
class Trained:
    """What `transferops train` did (also finetune.metrics, for DVC)."""

    val_accuracy: float
    val_loss: float
    unfreeze_depth: int
    epochs: int
    seconds: float
    reused_from: str | None = None  # the search trial's model, when it was this very run
    weight_average: dict[str, Any] | None = None  # the averaged weights' val score (spec's)
    # "probe": no epoch beat the exact probe on val beyond noise (the net is that probe);
    # "classical": neither beat the classical model on val (keep_best_candidate)
    candidate: str = "finetuned"
    classical_val_accuracy: float | None = None
    precision: str | None = None  # what finetune.precision resolved to (the spec's)
    block_lr_scale: float | None = None  # what finetune.block_lr_scale resolved to (the spec's)


def log_trained(mlflow: Any, t: Trained) -> None:
    """What a `train` run (or a member of its ensemble) did, into its MLflow run: the
    outcome every training run logs (:func:`runtime.tracking.log_outcome`)."""
    log_outcome(mlflow, t.val_accuracy, t.weight_average, t.precision, t.block_lr_scale)


def log_spec_outcome(mlflow: Any, val_accuracy: float, spec: dict[str, Any]) -> None:
    """The same outcome for a run known by its model spec (a search trial, a baseline run)."""
    log_outcome(
        mlflow,
        val_accuracy,
        spec.get("weight_average"),
        spec.get("precision"),
        spec.get("block_lr_scale"),
    )


def same_run(folder: Path, cfg: Config, data_hash: str, source_sha: str) -> bool:
    """Whether `folder` holds a model trained exactly as `cfg` says: same data, source and
    trajectory params (training is deterministic, so retraining gives the same weights)."""
    if not (folder / SPEC_FILE).exists():
        return False
    spec = read_json(folder / SPEC_FILE)
    return not spec.get("members") and _same(spec, cfg, data_hash, source_sha)


def member_of(folder: Path, cfg: Config, data_hash: str, source_sha: str) -> int | None:
    """The index of the member of the ensemble in `folder` trained exactly as `cfg` says
    (its seed included), or None."""
    if not (folder / SPEC_FILE).exists():
        return None
    spec = read_json(folder / SPEC_FILE)
    for i in range(len(spec.get("members") or [])):
        if _same(member_spec(spec, i), cfg, data_hash, source_sha):
            return i
    return None


def _same_data(spec: dict[str, Any], data_hash: str, source_sha: str) -> bool:
    return spec["data_hash"] == data_hash and source_id(spec["source"]) == source_sha


def _same(spec: dict[str, Any], cfg: Config, data_hash: str, source_sha: str) -> bool:
    trained = {k: spec["finetune"].get(k) for k in FinetuneConfig.trajectory_fields()}
    return (
        _same_data(spec, data_hash, source_sha)
        and trained == cfg.finetune.trajectory_params()
        # the same settings train in bf16 on one machine and fp32 on another (auto): a
        # model trained in the other precision is not this run (a spec without it: older)
        and spec.get("precision", "?") in ("?", precision_here(cfg.finetune, spec["source"]))
    )


def precision_here(cfg: FinetuneConfig, source: dict[str, Any]) -> str:
    """What finetune.precision resolves to on this machine for the source's family
    ("bf16" | "fp32"): what a model trained here records as its spec's ``precision``."""
    bf16 = runs_bf16(cfg.precision, pick_device(cfg.device), family(source["family"]))
    return "bf16" if bf16 else "fp32"


def reuse_model(
    folder: Path, dst: Path, labels: dict[str, Any], member: int | None = None
) -> tuple[dict, list[dict]]:
    """Copy a trained model folder (or member `member` of an ensemble's) to `dst` (`labels`
    added to its spec) and replay its per-epoch curves into the active MLflow run, as if
    trained there; (spec, history)."""
    with atomic_dir(dst) as tmp:
        if member is None:
            copy_folder(folder, tmp)
        else:
            save_member(folder, member, tmp, folder)
        spec = read_json(tmp / SPEC_FILE) | labels
        history = read_json(tmp / "history.json")
        write_json_atomic(tmp / SPEC_FILE, spec)
    replay_curves(history)
    return spec, history


def replay_curves(history: list[dict]) -> None:
    """A finished run's per-epoch records into the active MLflow run, as if trained there."""
    for rec in history:
        log_epoch(int(rec["epoch"]), rec)


def train_from_config(cfg: Config, resume: bool = True) -> Trained:
    """`transferops train`: fine-tune with fixed params into finetune.out, as an MLflow run
    (role ``train``, its per-epoch curves), and finetune.metrics. When the search's best
    trial was this very run (search.out/best_model), its model is copied, not retrained.
    With ``finetune.ensemble`` > 1 the seeds finetune.seed, +1, ... are each trained (a
    nested run each) and finetune.out is their ensemble."""
    fc = cfg.finetune
    manifest, source = read_manifest(cfg.data.out), read_source_manifest(cfg.source.out)
    check_trainable(cfg, manifest, source)
    data_hash = manifest["data_hash"]
    mlflow = setup_tracking(cfg.tracking)
    tags = {"role": "train", "data_hash": data_hash, "source": source["origin"]}
    with start_run(mlflow, run_name="train", tags=tags | {"source_sha256": source["sha256"]}) as r:
        log_data(mlflow, cfg.data.out, Path(cfg.data.path).name, data_hash, "training")
        mlflow.log_params(fc.run_params())
        runners = runner_up_models(cfg, data_hash, source_id(source))
        val_probs = ValProbs(cfg.data.out, fc.device)  # each model's val pass once
        if fc.ensemble == 1 and not runners:
            done = _train_one(cfg, mlflow, r.info.run_id, resume, data_hash, source_id(source))
        else:
            done = _train_ensemble(cfg, mlflow, r.info.run_id, resume, tags, runners, val_probs)
            if done.reused_from:  # its first member is the search's best trial
                mlflow.set_tag("reused_from", done.reused_from)
        log_trained(mlflow, done)
        done = keep_best_candidate(cfg, done, r.info.run_id, val_probs)
        mlflow.set_tag("candidate", done.candidate)
        mlflow.log_metrics({k: v for k, v in calibrate(cfg, val_probs).items()})
    write_json_atomic(
        Path(fc.metrics), {k: v for k, v in asdict(done).items() if k != "reused_from"}
    )
    how = f"copied from {done.reused_from}" if done.reused_from else f"{done.epochs} epochs"
    log.info(
        "fine-tuned model written to %s (val accuracy %.4f, %s)", fc.out, done.val_accuracy, how
    )
    return done


def _train_one(
    cfg: Config, mlflow: Any, run_id: str, resume: bool, data_hash: str, source_sha: str
) -> Trained:
    """One fine-tuning run into finetune.out: the search's best trial copied when it was this
    very run, else trained (resuming its checkpoint)."""
    trial = Path(cfg.search.out) / BEST_MODEL
    if same_run(trial, cfg, data_hash, source_sha):
        mlflow.set_tag("reused_from", str(trial))
        return _copy_trial(trial, cfg, run_id)
    return _train(cfg, run_id, resume)


def runner_up_models(cfg: Config, data_hash: str, source_sha: str) -> list[Path]:
    """The search's next-best trials that join the ensemble (finetune.ensemble_trials - 1 at
    most, best first): only when its best trial is this very configuration (train runs the
    search's pick), and only trials trained on this data and source."""
    root = Path(cfg.search.out)
    order = root / RUNNERS_UP / "order.json"
    k = cfg.finetune.ensemble_trials - 1
    if k < 1 or not order.exists() or not same_run(root / BEST_MODEL, cfg, data_hash, source_sha):
        return []
    folders = [root / RUNNERS_UP / str(n) for n in read_json(order)[:k]]
    return [f for f in folders if _same_data(read_json(f / SPEC_FILE), data_hash, source_sha)]


def _train_ensemble(
    cfg: Config,
    mlflow: Any,
    run_id: str,
    resume: bool,
    tags: dict[str, str],
    runners: list[Path],
    val_probs: ValProbs,
) -> Trained:
    """Train the ensemble's seed members one by one (each a model folder under
    :func:`member_dir`, so a crash loses at most the member in training), then write their
    ensemble with the search's `runners` up (trained already)."""
    fc = cfg.finetune
    data_hash, source_sha = tags["data_hash"], source_id(read_source_manifest(cfg.source.out))
    folders, runs = [], []
    for seed in range(fc.seed, fc.seed + fc.ensemble):
        folder = member_dir(cfg, seed)
        mcfg = with_overrides(
            cfg,
            {
                "finetune.seed": seed,
                "finetune.ensemble": 1,
                "finetune.out": str(folder),
                "finetune.checkpoint_dir": str(folder.with_suffix(".checkpoint")),
            },
        )
        run_tags = tags | {"role": "train-member", "seed": str(seed)}
        with start_run(
            mlflow, run_name=f"train-s{seed}", tags=run_tags, nested=True, parent_run_id=run_id
        ) as m:
            if resume and same_run(folder, mcfg, data_hash, source_sha):
                runs.append(_member_done(folder))  # trained before a crash: kept
            else:
                runs.append(_train_one(mcfg, mlflow, m.info.run_id, resume, data_hash, source_sha))
            log_trained(mlflow, runs[-1])
        folders.append(folder)
    for folder in _joining(cfg, folders, runners, val_probs):  # trained by the search
        spec, history = read_json(folder / SPEC_FILE), read_json(folder / "history.json")
        run_tags = tags | {"role": "train-member", "seed": str(spec["finetune"]["seed"])}
        run_tags |= {"trial": str(spec["trial"]), "reused_from": str(folder)}
        with start_run(
            mlflow,
            run_name=f"train-trial{spec['trial']}",
            tags=run_tags,
            nested=True,
            parent_run_id=run_id,
        ):
            replay_curves(history)
            runs.append(_trained(spec, history, str(folder)))
            log_trained(mlflow, runs[-1])
        folders.append(folder)
    # The member folders stay: the baseline's transfer runs of these seeds reuse them, also
    # when the classical candidate takes finetune.out's place
    return _assemble(cfg, folders, runs, run_id, val_probs)


def _joining(
    cfg: Config, seeds: list[Path], runners: list[Path], val_probs: ValProbs
) -> list[Path]:
    """The search's runners-up that join the seeds' ensemble: those that raise its val score
    (greedy ensemble selection, registry.metric then log-loss), each said in the log."""
    joined = []
    for folder, before, after in greedy_join(cfg.registry.metric, seeds, runners, val_probs):
        spec = read_json(folder / SPEC_FILE)
        joins = after > before
        log.info(
            "search %s %s the ensemble: val %s %.4f -> %.4f, log-loss %.4f -> %.4f",
            member_label(spec),
            "joins" if joins else "does not join",
            cfg.registry.metric,
            before[0],
            after[0],
            -before[1],
            -after[1],
        )
        joined += [folder] if joins else []
    return joined


def member_dir(cfg: Config, seed: int) -> Path:
    """Where `train` keeps the ensemble's member of `seed` (a model folder)."""
    return Path(cfg.finetune.checkpoint_dir) / "members" / f"s{seed}"


def _member_done(folder: Path) -> Trained:
    return _trained(read_json(folder / SPEC_FILE), read_json(folder / "history.json"))


def _trained(spec: dict[str, Any], history: list[dict], reused_from: str | None = None) -> Trained:
    """What a finished run's folder (its spec and history) says it did; no training time."""
    return Trained(
        spec["val_accuracy"],
        spec["val_loss"],
        spec["finetune"]["unfreeze_depth"],
        len(history),
        0.0,
        reused_from,
        weight_average=spec.get("weight_average"),
        candidate=spec.get("candidate", "finetuned"),
        precision=spec.get("precision"),
        block_lr_scale=spec.get("block_lr_scale"),
    )


def _assemble(
    cfg: Config, folders: list[Path], runs: list[Trained], run_id: str, val_probs: ValProbs
) -> Trained:
    """finetune.out := the ensemble of the member folders, scored on val (the mean of the
    members' val probabilities: what the ensemble's network outputs). One member (one seed,
    no runner-up joined), or members that all ended as the exact probe (one model), is
    written alone."""
    fc = cfg.finetune
    loaded = [load_finetuned(f) for f in folders]
    specs = [s for _, s in loaded]
    if len(folders) == 1 or all(s.get("candidate") == "probe" for s in specs):
        if len(folders) > 1:
            log.info("every member of the ensemble is the exact probe: it is the model, once")
        reuse_model(folders[0], Path(fc.out), {"mlflow_run_id": run_id})
        return replace(runs[0], seconds=round(sum(r.seconds for r in runs), 2))
    net = Ensemble([n for n, _ in loaded])
    spec0 = specs[0]
    probs = np.mean([val_probs(f) for f in folders], axis=0)
    y = val_probs.labels
    acc, loss = float((probs.argmax(1) == y).mean()), nll(probs, y)
    members = [
        {k: s.get(k) for k in MEMBER_KEYS} | {"history": read_json(f / "history.json")}
        for f, s in zip(folders, specs, strict=True)
    ]
    drop = {*MEMBER_KEYS, "weights_sha256", "temperature", "calibration", "mlflow_run_id"}
    spec = {k: v for k, v in spec0.items() if k not in drop} | {
        "finetune": fc.model_dump(mode="json"),
        "members": members,
        "candidate": "ensemble",
        "val_accuracy": acc,
        "val_loss": loss,
        "weight_average": None,
        "mlflow_run_id": run_id,
    }
    save_model_folder(net, spec, [], Path(fc.out), Path(cfg.source.out))
    val_probs.remember(Path(fc.out), probs)
    log.info(
        "ensemble of %d runs: val accuracy %.4f (members %s), log-loss %.4f",
        len(runs),
        acc,
        "; ".join(member_label(m) for m in members),
        loss,
    )
    return Trained(
        acc,
        loss,
        fc.unfreeze_depth,
        sum(r.epochs for r in runs),
        round(sum(r.seconds for r in runs), 2),
        reused_from=runs[0].reused_from,  # the first member: the search's best trial
        candidate="ensemble",
        precision="+".join(sorted({r.precision or "fp32" for r in runs})),
        block_lr_scale=runs[0].block_lr_scale
        if len({r.block_lr_scale for r in runs}) == 1
        else None,
    )


def keep_best_candidate(
    cfg: Config, done: Trained, run_id: str, val_probs: ValProbs | None = None
) -> Trained:
    """Put the classical pixel model in finetune.out instead when fine-tuning does not beat
    it on val (registry.metric, then log-loss): the expensive model must earn its place, as
    every epoch must beat the exact probe. Image data with registry.classical_candidate
    only."""
    fc = cfg.finetune
    if not cfg.registry.classical_candidate or read_manifest(cfg.data.out)["modality"] != "image":
        return done
    fit = fit_classical(load_prepared(cfg.data.out, "train"))
    val = load_prepared(cfg.data.out, "val")
    acc, loss = val_score(fit, val)
    done = replace(done, classical_val_accuracy=acc)
    metric = cfg.registry.metric
    ours, theirs = done.val_accuracy, acc
    if metric != "accuracy":  # compared as the gates will compare them
        val_probs = val_probs or ValProbs(cfg.data.out, fc.device)
        y, k = val.labels.numpy(), len(val.class_names)
        ours = metric_value(metric, y, val_probs(Path(fc.out)).argmax(1), k)
        theirs = metric_value(metric, y, fit.probs(val).argmax(1), k)
    if (ours, -done.val_loss) > (theirs, -loss):
        return done
    tuned = read_json(Path(fc.out) / SPEC_FILE)
    keep = ("format_version", "class_names", "modality", "image_size", "image_resize", "data_hash")
    source = pixel_source()
    spec = {k: tuned[k] for k in keep} | {
        "source": source,
        "input": source["input"],
        "finetune": {},
        "candidate": "classical",
        "classical": {"name": fit.name, "C": fit.clf.C},
        "val_accuracy": acc,
        "val_loss": loss,
        "weight_average": None,
        "mlflow_run_id": run_id,
    }
    net = pixel_net(fit, tuned["image_size"] or 32)
    save_model_folder(net, spec, [], Path(fc.out), Path(cfg.source.out))
    log.info(
        "%s: val %s %.4f (log-loss %.3f) against fine-tuning's %.4f (%.3f): fine-tuning does "
        "not beat it, so it is the candidate in %s (registry.classical_candidate)",
        fit.name,
        metric,
        theirs,
        loss,
        ours,
        done.val_loss,
        fc.out,
    )
    return replace(
        done, candidate="classical", val_accuracy=acc, val_loss=loss, block_lr_scale=None
    )


def _train(cfg: Config, run_id: str, resume: bool) -> Trained:
    fc = cfg.finetune
    checkpoint = Path(fc.checkpoint_dir) / "last.pt"
    if not resume:
        checkpoint.unlink(missing_ok=True)
    res, spec = train_model(cfg, on_epoch_end=log_epoch, checkpoint=checkpoint)
    save_finetuned(res, spec | {"mlflow_run_id": run_id}, Path(fc.out), Path(cfg.source.out))
    checkpoint.unlink(missing_ok=True)  # the model is safe: 50+ MB of optimizer state is not
    return Trained(
        res.best_val_accuracy,
        res.best_val_loss,
        res.unfreeze_depth,
        res.epochs_run,
        round(res.seconds, 2),
        weight_average=spec["weight_average"],
        candidate=spec["candidate"],
        precision=spec["precision"],
        block_lr_scale=spec["block_lr_scale"],
    )


def _copy_trial(trial: Path, cfg: Config, run_id: str) -> Trained:
    spec, history = reuse_model(trial, Path(cfg.finetune.out), {"mlflow_run_id": run_id})
    return _trained(spec, history, str(trial))
