"""`transferops baseline`: the runs `evaluate` compares, trained on train/val only.

Per seed in ``baseline.seeds``:

- ``transfer``: the fine-tuning config (with the search's best params when given),
- ``scratch``: the same architecture from a random init, every block trainable from the
  first stage on (1 head epoch, then all blocks), BatchNorm in train mode, no layer decay,
  ``baseline.lr``, and the same total epochs as the transfer schedule (x
  ``baseline.epoch_multiplier``),
- ``probe``: the pretrained backbone frozen (depth 0) for the same total epochs.

For the data-efficiency curve, transfer and scratch are also trained (first seed) on
few-shot subsets made by ``prepare``'s per-class limit (val and test unchanged).

Each run is an MLflow run tagged ``role``, ``seed``, ``per_class``, data hash and source, so
the UI compares them side by side; ``baseline.out/index.json`` lists them for `evaluate`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from transferops.config import Config, FloatRange, validate_config, with_overrides
from transferops.data.prepare import prepare
from transferops.data.prepared import read_manifest
from transferops.finetune.plan import total_epochs
from transferops.finetune.train import (
    BEST_MODEL,
    log_spec_outcome,
    member_dir,
    member_of,
    reuse_model,
    same_run,
    save_finetuned,
    train_model,
)
from transferops.runtime.artifacts import write_json_atomic
from transferops.runtime.cluster import (
    dask_client,
    release_stores,
    run_in_project,
    task_context,
    uses_dask,
    worker_store,
)
from transferops.runtime.progress import labelled, muted
from transferops.runtime.tracking import log_data, log_epoch, setup_tracking, start_run
from transferops.search.study import run_search
from transferops.sources.manifest import read_source_manifest, source_id

log = logging.getLogger(__name__)


def transfer_epochs(cfg: Config, num_blocks: int) -> int:
    """Total epochs of the transfer schedule (the budget the baselines get)."""
    return total_epochs(cfg.finetune, num_blocks)


def role_overrides(cfg: Config, role: str, seed: int, num_blocks: int) -> dict[str, Any]:
    """Finetune overrides that turn the transfer config into `role` with `seed`."""
    budget = transfer_epochs(cfg, num_blocks)
    o: dict[str, Any] = {"finetune.seed": seed}
    if role != "transfer":  # adapters are a way to fine-tune a pretrained model
        o["finetune.adapter"] = "none"
    if role == "scratch":
        total = max(2, round(budget * cfg.baseline.epoch_multiplier))
        o |= {
            "finetune.unfreeze_depth": num_blocks,
            "finetune.blocks_per_stage": num_blocks,
            "finetune.epochs_per_stage": [1, total - 1],
            "finetune.lr": cfg.baseline.lr,
            "finetune.layer_decay": 1.0,
            "finetune.init": "random",
            "finetune.bn_mode": "train",  # random BN statistics must be learned
            "finetune.head_init": "random",  # a probe of random features is no head start
        }
    elif role == "probe":
        o |= {"finetune.unfreeze_depth": 0, "finetune.epochs_per_stage": [budget]}
    return o


def _train_one(
    cfg: Config,
    name: str,
    role: str,
    seed: int,
    per_class: int | None,
    data_out: Path,
    source: dict[str, Any],
    store: dict | None,
) -> dict[str, Any]:
    out = Path(cfg.baseline.out)
    rcfg = with_overrides(
        cfg,
        {
            **role_overrides(cfg, role, seed, source["num_blocks"]),
            "data.out": str(data_out),
            "finetune.checkpoint_dir": str(out / ".checkpoints" / name),
        },
    )
    mlflow = setup_tracking(cfg.tracking)
    manifest = read_manifest(data_out)
    tags = {
        # Curve runs get their own role: grouped by role in the MLflow UI, the main comparison's
        # means must match the report's
        "role": role if per_class is None else f"curve-{role}",
        "comparison": "main" if per_class is None else "curve",
        "seed": str(seed),
        "per_class": str(per_class or "all"),
        "data_hash": manifest["data_hash"],
        "source": source["origin"],
        "source_sha256": source["sha256"],
    }
    trained = _already_trained(cfg, rcfg, role, manifest["data_hash"], source_id(source))
    with start_run(mlflow, run_name=name, tags=tags) as run:
        dataset = Path(cfg.data.path).name + (f"-k{per_class}" if per_class else "")
        log_data(mlflow, data_out, dataset, manifest["data_hash"], "training")
        mlflow.log_params(rcfg.finetune.run_params())
        labels = {"role": role, "seed": seed, "per_class": per_class}
        if trained is not None:
            folder, member = trained
            where = str(folder) + ("" if member is None else f" (member {member})")
            mlflow.set_tag("reused_from", where)
            spec, _ = reuse_model(
                folder, out / name, labels | {"mlflow_run_id": run.info.run_id}, member
            )
            val_accuracy = float(spec["val_accuracy"])
            how = f"reused {where}"
        else:
            with labelled(name):
                res, spec = train_model(
                    rcfg,
                    on_epoch_end=log_epoch,
                    checkpoint=Path(rcfg.finetune.checkpoint_dir) / "last.pt",
                    feature_store=store,
                )
            spec |= labels | {"mlflow_run_id": run.info.run_id}
            save_finetuned(res, spec, out / name, Path(cfg.source.out))
            # saved: the checkpoint (weights + optimizer state, 50+ MB a run) has done its job
            shutil.rmtree(rcfg.finetune.checkpoint_dir, ignore_errors=True)
            val_accuracy = res.best_val_accuracy
            how = f"{res.epochs_run} epochs, {res.seconds:.1f}s"
        log_spec_outcome(mlflow, val_accuracy, spec)
    log.info("%s: val accuracy %.4f (%s)", name, val_accuracy, how)
    return {
        "name": name,
        "role": role,
        "seed": seed,
        "per_class": per_class,
        "dir": str(out / name),
        "data_out": str(data_out),
        "mlflow_run_id": run.info.run_id,
        "val_accuracy": val_accuracy,
        "candidate": spec.get("candidate", "finetuned"),  # "probe": no epoch beat it on val
    }


def _already_trained(
    cfg: Config, rcfg: Config, role: str, data_hash: str, source_sha: str
) -> tuple[Path, int | None] | None:
    """The model folder `train`, the search or the scratch search left that is exactly this
    run (no second training), with the member's index when it is only inside the ensemble
    `train` wrote (its own folder gone); the search's copy and the members' folders serve
    when train wrote the classical model."""
    kept = {
        "transfer": [
            Path(rcfg.finetune.out),
            Path(cfg.search.out) / BEST_MODEL,
            member_dir(cfg, rcfg.finetune.seed),
        ],
        "scratch": [cfg.baseline.scratch_search / BEST_MODEL],
    }
    found = next((f for f in kept.get(role, []) if same_run(f, rcfg, data_hash, source_sha)), None)
    if found is not None:
        return found, None
    if role == "transfer":
        member = member_of(Path(rcfg.finetune.out), rcfg, data_hash, source_sha)
        if member is not None:
            return Path(rcfg.finetune.out), member
    return None


def scratch_lr(cfg: Config, num_blocks: int) -> float:
    """The from-scratch arm's own lr: an Optuna search of ``baseline.scratch_trials`` trials
    over search.space.lr on the first seed (every block trainable, pruned like the transfer
    search), so the verdict compares tuned with tuned. Its best trial is the first seed's
    scratch run (kept, not retrained). ``baseline.lr`` when scratch_trials is 0."""
    bc = cfg.baseline
    if bc.scratch_trials == 0:
        return bc.lr
    # the transfer search's lr range; a decade either side of baseline.lr when it has none
    lr = cfg.search.space.lr or FloatRange(low=bc.lr / 10, high=bc.lr * 10, log=True)
    space = {"lr": lr.model_dump(), "unfreeze_depth": None}
    scfg = with_overrides(
        cfg,
        role_overrides(cfg, "scratch", bc.seeds[0], num_blocks)
        | {
            "search.n_trials": bc.scratch_trials,
            "search.space": space,
            "search.out": str(bc.scratch_search),
            # the scratch arm is no ensemble: its search keeps its best trial's model only
            "finetune.ensemble_trials": 1,
        },
    )
    found = run_search(scfg)  # its lrs spread over the range, the middle first (start.py)
    lr = found.best_params["finetune.lr"]
    log.info(
        "scratch lr %.2g (best of %d trials, val %.4f)", lr, bc.scratch_trials, found.best_value
    )
    return lr


def _jobs(cfg: Config) -> list[tuple[str, str, int, int | None, Path]]:
    """(name, role, seed, per_class, data folder) of every baseline run, main runs first;
    the curve's few-shot subsets are prepared here."""
    bc = cfg.baseline
    roles = ["transfer", "scratch"] + (["probe"] if bc.linear_probe else [])
    jobs = [(f"{r}-s{s}", r, s, None, Path(cfg.data.out)) for s in bc.seeds for r in roles]
    for k in bc.efficiency_per_class:
        if k is None:
            continue  # "all" is the main comparison's first seed
        sub = Path(bc.out) / "data" / f"k{k}"
        with muted("transferops.data"):  # the main prepare warned about this data already
            result = prepare(
                with_overrides(
                    cfg, {"data.limit_per_class": k, "data.out": str(sub), "data.demo": None}
                )
            )
        log.info("few-shot subset k=%d: %d training examples (%s)", k, result.counts["train"], sub)
        jobs += [(f"{r}-k{k}", r, bc.seeds[0], k, sub) for r in ("transfer", "scratch")]
    return jobs


def _run_job(cfg_json: dict, job: tuple, source: dict[str, Any]) -> dict[str, Any]:
    """One baseline run (here or as a Dask task). Pretrained runs on the same data share
    the process's frozen features; scratch has none to share."""
    cfg = validate_config(cfg_json)
    name, role, seed, per_class, data_out = job
    key = ("baseline", str(Path(data_out).resolve()), read_manifest(data_out)["data_hash"])
    store = worker_store(key) if role != "scratch" else None
    return _train_one(cfg, name, role, seed, per_class, Path(data_out), source, store)


def run_baselines(cfg: Config) -> list[dict[str, Any]]:
    """Train transfer / scratch / probe over seeds, and the few-shot curve models: in this
    process, or as Dask tasks when ``compute`` asks for workers."""
    source = read_source_manifest(cfg.source.out)
    cfg = with_overrides(cfg, {"baseline.lr": scratch_lr(cfg, source["num_blocks"])})
    jobs = _jobs(cfg)
    cfg_json = cfg.model_dump(mode="json")
    if not uses_dask(cfg.compute):
        try:
            entries = [_run_job(cfg_json, job, source) for job in jobs]
        finally:
            release_stores()
    else:
        with dask_client(cfg.compute) as client:
            ctx = task_context(client)
            futures = [
                client.submit(run_in_project, ctx, _run_job, cfg_json, job, source, pure=False)
                for job in jobs
            ]
            entries = client.gather(futures)
    write_json_atomic(
        cfg.baseline.index,
        {
            "data_hash": read_manifest(cfg.data.out)["data_hash"],
            "seeds": cfg.baseline.seeds,
            "runs": entries,
        },
    )
    return entries
