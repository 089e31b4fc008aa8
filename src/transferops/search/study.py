"""`transferops search`: an Optuna study over the staged fine-tuning params.

Each trial is the engine's staged fine-tune on the train split, scored on val (the test split
is never read here), reported per epoch so the pruner can stop poor trials early. The study
lives in ``search.storage`` (sqlite by default, any SQLAlchemy URL) under a name derived from
the data hash, the source sha256 and the search config, so re-running after an interruption
resumes it: finished trials are kept, and a trial that was running when its process died is
failed by the heartbeat (also when it died before its first heartbeat) and retried once with
the same params.

MLflow: one parent run per search invocation, one nested child run per trial (params,
per-epoch metrics, tag ``state`` = complete / pruned / failed / duplicate), the best params
and value on the parent, and Optuna's plots as its artifacts. The best params go to
``search.out/best_params.json``, which ``transferops train --overrides-file`` reads.

Parallelism: with ``compute.n_workers > 1`` or ``compute.cluster`` each trial is a Dask task
(:mod:`transferops.runtime.cluster`) and the workers share the study through its storage. The
default sqlite file is safe for a few workers on one machine (sqlite serialises writes;
Optuna retries on lock); use PostgreSQL for more workers or several machines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from distributed import as_completed

from transferops.config import (
    Config,
    FloatRange,
    SearchConfig,
    check_depth,
    resolve_depth_range,
    validate_config,
    with_overrides,
)
from transferops.data.prepared import read_manifest
from transferops.errors import ConfigError
from transferops.finetune.engine import TrainResult
from transferops.finetune.plan import total_epochs
from transferops.finetune.selection import val_metric
from transferops.finetune.train import (
    BEST_MODEL,
    RUNNERS_UP,
    log_spec_outcome,
    save_finetuned,
    train_model,
)
from transferops.model.folder import SPEC_FILE
from transferops.runtime.artifacts import atomic_dir, copy_folder, sha256_json, write_json_atomic
from transferops.runtime.cluster import (
    dask_client,
    run_in_project,
    task_context,
    uses_dask,
    worker_label,
    worker_store,
)
from transferops.runtime.critical import critical
from transferops.runtime.progress import labelled, make_progress, quiet, run_label
from transferops.runtime.redact import mask
from transferops.runtime.services import check_scheduler
from transferops.runtime.study_storage import make_storage
from transferops.runtime.tracking import log_data, log_epoch, setup_tracking, start_run
from transferops.search.plots import log_search_plots
from transferops.search.start import START_TRIALS, start_points
from transferops.sources.manifest import read_source_manifest, source_id

log = logging.getLogger(__name__)
TS = optuna.trial.TrialState

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class SearchResult:
    """Outcome of a search (the whole study, not only this invocation)."""

    study_name: str
    storage: str
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    counts: dict[str, int]
    out: Path


# ------------------------------------------------------------------ the study


def study_name(cfg: Config) -> str:
    """Stable name from data hash + source sha256 + what the trials run and the points it
    starts from (so reruns resume)."""
    data_hash = read_manifest(cfg.data.out)["data_hash"]
    source = read_source_manifest(cfg.source.out)
    source_sha = source_id(source)
    start = start_points(resolve_depth_range(cfg, source["num_blocks"]).search)
    key = {
        "data": data_hash,
        "source": source_sha,
        "space": cfg.search.space.model_dump(mode="json"),
        "sampler": cfg.search.sampler,
        "seed": cfg.search.seed,
        "finetune": cfg.finetune.trajectory_params(),
    }
    if cfg.registry.metric != "accuracy":  # trials' values are that metric: another study
        key["metric"] = cfg.registry.metric
    if start:
        key["start"] = start
    # the arm and the data's name first: optuna-dashboard lists studies by name, the
    # transfer and scratch searches of the same data side by side
    data = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.data.path).stem).strip("-.")[:24] or "data"
    return f"transferops-{_arm(cfg)}-{data}-{data_hash[:8]}-{sha256_json(key)[:12]}"


def _arm(cfg: Config) -> str:
    """ "scratch" for the from-scratch arm's search (finetune.init random), else "transfer"."""
    return "scratch" if cfg.finetune.init == "random" else "transfer"


def _float_grid(r: FloatRange) -> list[float]:
    mid = math.sqrt(r.low * r.high) if r.log else (r.low + r.high) / 2
    return [r.low, mid, r.high]


def grid_space(sc: SearchConfig) -> dict[str, list[Any]]:
    """Grid sampler space: int ranges in full, float ranges as low / (geometric) mid / high."""
    space: dict[str, list[Any]] = {}
    for name in type(sc.space).model_fields:
        spec = getattr(sc.space, name)
        if spec is None:
            continue
        if isinstance(spec, list):  # categorical (adapter)
            space[name] = list(spec)
        else:
            space[name] = spec.values() if hasattr(spec, "values") else _float_grid(spec)
    return space


def make_sampler(sc: SearchConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (seeded) by default; random; or grid. `offset` shifts the seed: each worker, and
    each resumed process, draws its own sequence instead of replaying the first one (which
    made parallel and resumed searches repeat configurations). TPE's constant liar treats
    running trials as bad, so parallel workers do not all sample the same region."""
    seed = sc.seed + offset
    if sc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sc.sampler == "grid":
        return optuna.samplers.GridSampler(grid_space(sc), seed=seed)
    with warnings.catch_warnings():  # constant_liar is "experimental" in Optuna 4
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=min(START_TRIALS, sc.n_trials), constant_liar=True
        )


class NoisyMedianPruner(optuna.pruners.BasePruner):
    """The median rule, where trials differ and only by more than validation noise.

    A trial reports only from its first thaw on (the head-only stage 0 is the same for
    every trial: the same probe head, so comparing there compares the head lr at best, and
    pruned trials never ran their unfreeze depth). It is pruned when its validation accuracy
    is below the median of the other trials at the same epoch by more than `margin`, the
    spread of the difference of two accuracies on `val_size` examples (one standard error
    of a difference of proportions at the median), and only after `n_startup_trials` trials
    reported that epoch.
    """

    def __init__(self, val_size: int, n_startup_trials: int = 2, z: float = 1.0) -> None:
        self.val_size = max(1, val_size)
        self.n_startup_trials = n_startup_trials
        self.z = z

    def margin(self, median: float) -> float:
        """Validation noise at accuracy `median`: z * sqrt(2 p (1 - p) / n)."""
        p = min(max(median, 1.0 / self.val_size), 1.0 - 1.0 / self.val_size)
        return self.z * math.sqrt(2.0 * p * (1.0 - p) / self.val_size)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=FINISHED)
            if step in t.intermediate_values and t.number != trial.number
        ]
        if len(others) < self.n_startup_trials:
            return False
        median = statistics.median(others)
        return trial.intermediate_values[step] < median - self.margin(median)


def make_pruner(sc: SearchConfig, max_epochs: int, val_size: int) -> optuna.pruners.BasePruner:
    """The median rule beyond validation noise (:class:`NoisyMedianPruner`), Hyperband over
    epochs, or none. Trials report only from their first thaw on (see :func:`_objective`)."""
    if sc.pruner == "median":
        return NoisyMedianPruner(val_size)
    if sc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, max_epochs))
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, sc: SearchConfig) -> dict[str, Any]:
    """Sample one point of the space as dotted finetune overrides."""
    out: dict[str, Any] = {}
    sp = sc.space
    for name in ("lr", "layer_decay", "weight_decay"):
        r = getattr(sp, name)
        if r is not None:
            out[f"finetune.{name}"] = trial.suggest_float(name, r.low, r.high, log=r.log)
    if sp.unfreeze_depth is not None:
        d = sp.unfreeze_depth
        if d.choices is not None:
            out["finetune.unfreeze_depth"] = trial.suggest_categorical("unfreeze_depth", d.choices)
        else:
            out["finetune.unfreeze_depth"] = trial.suggest_int("unfreeze_depth", d.low, d.high)
    if sp.adapter is not None:
        out["finetune.adapter"] = trial.suggest_categorical("adapter", sp.adapter)
    return out


def _max_epochs(cfg: Config, num_blocks: int) -> int:
    """Epochs of the deepest trial: the pruner's maximum resource."""
    depth = cfg.search.space.unfreeze_depth
    top = max(depth.values()) if depth is not None else cfg.finetune.unfreeze_depth
    deepest = cfg.finetune.model_copy(update={"unfreeze_depth": min(top, num_blocks)})
    return total_epochs(deepest, num_blocks)


# ---------------------------------------------------------------- the worker


@contextlib.contextmanager
def _trial_run(
    cfg: Config, parent: str | None, trial: optuna.Trial, overrides: dict[str, Any]
) -> Iterator[Any]:
    """An MLflow child run of the search's parent run for one trial (params logged)."""
    mlflow = setup_tracking(cfg.tracking)
    with start_run(
        mlflow,
        run_name=f"{_arm(cfg)}-trial-{trial.number}",
        nested=True,
        parent_run_id=parent,
        tags={"role": "trial", "arm": _arm(cfg), "trial": str(trial.number)},
    ) as run:
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        mlflow.log_params({k.removeprefix("finetune."): v for k, v in overrides.items()})
        yield mlflow


class DuplicateTrial(RuntimeError):
    """A trial whose configuration the study already holds (finished or running)."""


def _objective(cfg: Config, parent_run_id: str | None, store: dict, task: str | None = None) -> Any:
    def objective(trial: optuna.Trial) -> float:
        overrides = suggest(trial, cfg.search)
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr("threads", torch.get_num_threads())  # for search.budget_s
        if task is not None:  # the Dask task running it (see _take_over)
            trial.set_user_attr("task", task)
        # A configuration already finished or running is not trained again, and the repeat
        # does not count toward n_trials: it ends FAIL (tagged duplicate) and another is drawn.
        for t in trial.study.get_trials(deepcopy=False, states=(TS.COMPLETE, TS.RUNNING)):
            if t.params == trial.params and t.number != trial.number:
                trial.set_user_attr("duplicate_of", t.number)
                with _trial_run(cfg, parent_run_id, trial, overrides) as mlflow:
                    mlflow.set_tag("state", "duplicate")
                raise DuplicateTrial(f"trial #{trial.number} repeats #{t.number}: not run")

        best = [0.0]  # the trial's best val accuracy so far: what it would return now

        def report(epoch: int, rec: dict[str, float]) -> None:
            log_epoch(epoch, rec)  # into the trial's MLflow run
            best[0] = max(best[0], rec["val_accuracy"])
            if rec["stage"] == 0:  # the head-only stage every trial shares: nothing to compare
                return
            with critical():  # the study's store, like MLflow's: not split by an interrupt
                trial.report(best[0], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (stage {rec['stage']})")

        pruned = None
        with (
            _trial_run(cfg, parent_run_id, trial, overrides) as mlflow,
            labelled(run_label(f"trial {trial.number}")),
        ):
            try:
                res, spec = train_model(
                    with_overrides(cfg, overrides), on_epoch_end=report, feature_store=store
                )
            except optuna.TrialPruned as exc:
                # MLflow has no "pruned" status: KILLED (stopped before the end) + the tag
                mlflow.set_tag("state", "pruned")
                mlflow.end_run("KILLED")
                pruned = exc
            except Exception:
                mlflow.set_tag("state", "failed")
                raise
            else:
                mlflow.set_tag("state", "complete")
                if res.probe is not None:  # what the trial had to beat (no_headroom)
                    trial.set_user_attr("probe_val_accuracy", res.probe.val_accuracy)
                    trial.set_user_attr("val_accuracy", res.best_val_accuracy)
                log_spec_outcome(mlflow, res.best_val_accuracy, spec)
                value = _value(cfg, res, spec)
                if cfg.registry.metric != "accuracy":
                    mlflow.log_metric(f"val_{cfg.registry.metric}", value)
                _keep_if_top(cfg, trial, res, spec, value)
        if pruned is not None:
            raise pruned
        return value

    return objective


def _kept(cfg: Config, study: str) -> Path:
    """Where a study's best-so-far trial models wait for the search to end."""
    out = Path(cfg.search.out)
    return out.with_name(f".{out.name}-trials") / study


def _value(cfg: Config, res: TrainResult, spec: dict) -> float:
    """A complete trial's objective: its model's val score by registry.metric (the metric
    the gates decide on; accuracy is the run's own best val accuracy, no extra pass)."""
    if cfg.registry.metric == "accuracy":
        return res.best_val_accuracy
    device = cfg.finetune.device
    return val_metric(cfg.registry.metric, res.net, spec, cfg.data.out, cfg.source.out, device)


def _keep_if_top(
    cfg: Config, trial: optuna.Trial, res: TrainResult, spec: dict, value: float
) -> None:
    """A complete trial among the best ``finetune.ensemble_trials`` finished so far keeps its
    model: `train` copies the best instead of training it a second time, and averages the
    next ones into its ensemble."""
    done = trial.study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
    better = sum(t.value is not None and t.value > value for t in done)
    if better < cfg.finetune.ensemble_trials:
        folder = _kept(cfg, trial.study.study_name) / str(trial.number)
        save_finetuned(res, spec | {"trial": trial.number}, folder, Path(cfg.source.out))


def runners_up(study: optuna.Study, best: optuna.trial.FrozenTrial, k: int) -> list[int]:
    """The next `k` complete trials after `best`, by val score (then the earlier first)."""
    done = study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
    ranked = sorted(
        (t for t in done if t.number != best.number and t.value is not None),
        key=lambda t: (-t.value, t.number),
    )
    return [t.number for t in ranked[:k]]


def _log_trial(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial (what a log file or a Prefect worker shows)."""
    value = t.value if t.value is not None else t.intermediate_values.get(t.last_step or 0)
    shown = f"{value:.4f}" if value is not None else "-"
    at = f" at epoch {t.last_step}" if t.state == optuna.trial.TrialState.PRUNED else ""
    what = run_label(f"trial #{t.number} {t.state.name.lower()}{at}")
    log.info("%s: val accuracy %s, %s", what, shown, t.params)


def _val_size(cfg: Config) -> int:
    return sum(read_manifest(cfg.data.out)["counts"]["val"].values())


def within_noise(study: optuna.Study, val_size: int) -> dict[str, Any]:
    """The complete trials val cannot tell from the best: within validation noise of its
    score (one standard error of a difference of two accuracies on `val_size` examples, the
    pruner's margin; for macro-F1 or balanced accuracy the same figure, an approximation).
    When several are, which of them the search picked is noise, not a finding."""
    best = study.best_trial
    margin = NoisyMedianPruner(val_size).margin(float(best.value))
    complete = study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
    tied = [t.number for t in complete if float(best.value) - float(t.value) <= margin]
    return {"trials": tied, "of": len(complete), "margin": margin, "val_size": val_size}


def _say_within_noise(noise: dict[str, Any]) -> None:
    others = len(noise["trials"]) - 1
    if others:
        log.info(
            "val cannot tell the best trial from %d other complete configuration(s) of %d "
            "(within %.1f points, one standard error on %d val examples): which of them "
            "the search picked is noise, not a finding",
            others,
            noise["of"],
            100 * noise["margin"],
            noise["val_size"],
        )
    else:
        log.info(
            "the best trial beats every other complete configuration by more than val noise "
            "(%.1f points on %d val examples)",
            100 * noise["margin"],
            noise["val_size"],
        )


def _load_for_worker(cfg: Config, name: str, slot: int) -> optuna.Study:
    """The shared study with this worker's sampler and the pruner."""
    num_blocks = read_source_manifest(cfg.source.out)["num_blocks"]
    study = optuna.load_study(study_name=name, storage=make_storage(cfg.search))
    # Slot 0 of a fresh study keeps search.seed (a one-process search is reproducible);
    # other slots and resumed processes shift it, so none replays another's draws.
    offset = slot * 10_007 + len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg.search, offset)
    study.pruner = make_pruner(cfg.search, _max_epochs(cfg, num_blocks), _val_size(cfg))
    quiet("optuna")
    return study


def _run_here(cfg: Config, name: str, parent_run_id: str) -> None:
    """The search in this process: optimise until the study holds n_trials finished."""
    study = _load_for_worker(cfg, name, 0)
    store: dict = {}  # frozen features shared by the trials
    for _ in range(3):
        left = cfg.search.n_trials - _count(study, lambda t: t.state in FINISHED)
        repeats = _count(study, lambda t: "duplicate_of" in t.user_attrs)
        # a study stopped without headroom stays stopped when the step runs again
        if left <= 0 or _over_budget(study, cfg.search) or no_headroom(study, cfg.search):
            return
        _optimize(cfg, study, left, parent_run_id, store)
        if _count(study, lambda t: "duplicate_of" in t.user_attrs) == repeats:
            return  # no repeat this round: the trials it lacks failed, and are not redrawn


def _count(study: optuna.Study, which: Any) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if which(t))


def _progress_fields(study: optuna.Study, n: int) -> dict[str, Any]:
    """The trials bar: finished of n, and the counts per state with the best so far."""
    ts = study.get_trials(deepcopy=False)
    done = sum(t.state == TS.COMPLETE for t in ts)
    pruned = sum(t.state == TS.PRUNED for t in ts)
    failed = sum(t.state == TS.FAIL for t in ts)
    best = f"best {study.best_value:.4f} (#{study.best_trial.number})" if done else ""
    return {
        "completed": min(n, done + pruned),
        "info": f"done {done} pruned {pruned} failed {failed} {best}",
    }


def cpu_seconds(study: optuna.Study) -> float:
    """Compute the study's finished trials used: wall time x threads, summed (any worker)."""
    return sum(
        (t.datetime_complete - t.datetime_start).total_seconds() * t.user_attrs.get("threads", 1)
        for t in study.get_trials(deepcopy=False)
        if t.datetime_complete is not None and t.datetime_start is not None
    )


def _over_budget(study: optuna.Study, sc: SearchConfig) -> bool:
    return sc.budget_s is not None and cpu_seconds(study) >= sc.budget_s


def no_headroom(study: optuna.Study, sc: SearchConfig) -> str | None:
    """Why the search stops before n_trials, when ``search.stop_without_headroom`` trials
    completed and not one epoch of theirs beat the exact probe on val (every trial starts
    from that probe, so its val score is the floor): the probe is the model, and more
    configurations of the same recipe would not pay. None while there is headroom."""
    k = sc.stop_without_headroom
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,))
        if "probe_val_accuracy" in t.user_attrs
    ]
    # accuracies both (the trial's value is by registry.metric; its accuracy is kept beside)
    beat = any(
        t.user_attrs.get("val_accuracy", t.value) > t.user_attrs["probe_val_accuracy"] for t in done
    )
    if not k or len(done) < k or beat:
        return None
    probe = done[0].user_attrs["probe_val_accuracy"]
    return (
        f"no headroom: in {len(done)} complete trials no fine-tuned epoch beat the exact probe "
        f"on val ({probe:.4f}), so the probe is the model and the search stops "
        "(search.stop_without_headroom)"
    )


def _optimize(
    cfg: Config, study: optuna.Study, left: int, parent_run_id: str | None, store: dict
) -> None:
    n = cfg.search.n_trials
    # optimize() starts a trial before any callback can stop it: cap at what is left, and
    # let MaxTrialsCallback stop once the study (shared with other processes) holds n.
    stop = optuna.study.MaxTrialsCallback(n, states=FINISHED)
    with make_progress() as prog:
        task = prog.add_task(run_label("trials"), total=n, info="")

        def progress(study: optuna.Study, _t: optuna.trial.FrozenTrial) -> None:
            prog.update(task, **_progress_fields(study, n))

        def budget(study: optuna.Study, _t: optuna.trial.FrozenTrial) -> None:
            if _over_budget(study, cfg.search) or no_headroom(study, cfg.search):
                study.stop()

        progress(study, None)  # type: ignore[arg-type]
        study.optimize(
            _objective(cfg, parent_run_id, store),
            n_trials=left,
            timeout=cfg.search.timeout_s,
            catch=(RuntimeError, ValueError),
            callbacks=[stop, budget, progress, _log_trial],
        )


# ------------------------------------------------------------- on Dask


def _trial_task(cfg_json: dict, name: str, parent_run_id: str, slot: int) -> str:
    """One trial of the shared study, as a Dask task; the worker's ``host:pid``."""
    cfg = validate_config(cfg_json)
    study = _load_for_worker(cfg, name, slot)
    task = f"{parent_run_id}:{slot}"  # unique to this search invocation and task
    _take_over(study, task)
    store = worker_store(("search", name))  # the worker's next trials reuse its features
    study.optimize(
        _objective(cfg, parent_run_id, store, task),
        n_trials=1,
        catch=(RuntimeError, ValueError),
        callbacks=[_log_trial],
    )
    return worker_label()


def _take_over(study: optuna.Study, task: str) -> None:
    """Dask reruns a task whose worker died. The trial that run left RUNNING is failed now
    and queued again with its params (retried once, as the heartbeat would, without waiting
    out its grace period); this task then runs the retry."""
    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
        if t.user_attrs.get("task") == task and t.user_attrs.get("worker_pid") != os.getpid():
            study._storage.set_trial_state_values(t._trial_id, TS.FAIL)
            dead = study._storage.get_trial(t._trial_id)
            optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, dead)
            log.info(
                "trial #%d: its worker died; failed, and retried with the same params", t.number
            )


def _budget_used(study: optuna.Study) -> int:
    """Trials that count toward n_trials: finished ones and those that failed in training.
    A duplicate is redrawn, and a trial whose worker died is retried by the heartbeat."""
    trials = study.get_trials(deepcopy=False)
    retried = {optuna.storages.RetryFailedTrialCallback.retried_trial_number(t) for t in trials}
    return sum(
        t.state in FINISHED
        or (t.state == TS.FAIL and "duplicate_of" not in t.user_attrs and t.number not in retried)
        for t in trials
    )


def _run_on_dask(cfg: Config, name: str, parent_run_id: str) -> None:
    """One Dask task per trial, as many in flight as the cluster has workers, until the
    study holds n_trials or search.timeout_s runs out (a worker that dies has its task
    rerun by Dask, and the rerun fails and retries its trial: _take_over)."""
    sc = cfg.search
    storage = make_storage(sc)
    deadline = None if sc.timeout_s is None else time.monotonic() + sc.timeout_s
    cfg_json = cfg.model_dump(mode="json")
    with dask_client(cfg.compute) as client, make_progress() as prog:
        ctx = task_context(client)
        width = max(1, sum(ctx["hosts"].values()))
        log.info("search on Dask: %d worker(s) on %s", width, ", ".join(ctx["hosts"]))
        bar = prog.add_task(run_label("trials"), total=sc.n_trials, info="")
        running = as_completed()
        slot = 0

        def fill() -> None:
            nonlocal slot
            study = optuna.load_study(study_name=name, storage=storage)
            prog.update(bar, **_progress_fields(study, sc.n_trials))
            while (
                running.count() < width
                and _budget_used(study) + running.count() < sc.n_trials
                and slot < 3 * sc.n_trials
                and (deadline is None or time.monotonic() < deadline)
                and not _over_budget(study, sc)
                and not no_headroom(study, sc)
            ):
                args = (cfg_json, name, parent_run_id, slot)
                running.add(client.submit(run_in_project, ctx, _trial_task, *args, pure=False))
                slot += 1

        fill()
        for done in running:
            done.result()  # a trial's own error is caught in it; this is the task's
            fill()


def _run_trials(cfg: Config, name: str, parent_run_id: str) -> None:
    if uses_dask(cfg.compute):
        _run_on_dask(cfg, name, parent_run_id)
    else:
        _run_here(cfg, name, parent_run_id)


def _say_if_short(study: optuna.Study, sc: SearchConfig) -> None:
    """A search that ends with fewer trials than asked says so, and why."""
    finished = _count(study, lambda t: t.state in FINISHED)
    if finished < sc.n_trials:
        stopped = no_headroom(study, sc)
        if stopped:
            log.info(
                "the study holds %d of the %d trials asked for: %s", finished, sc.n_trials, stopped
            )
            return
        if _over_budget(study, sc):
            why = f"search.budget_s ({sc.budget_s:g} CPU s) is spent ({cpu_seconds(study):.0f})"
        elif sc.timeout_s is not None:
            why = f"search.timeout_s ({sc.timeout_s:g} s) ran out"
        else:
            why = "the others failed (see above)"
        log.warning("the study holds %d of the %d trials asked for: %s", finished, sc.n_trials, why)


def _best_trial(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict[str, int]]:
    """The best trial and the count of trials per state; refuses a study with none complete."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
        raise ConfigError(
            f"study {study.study_name}: no trial completed ({counts}); see the logs above"
        )
    return study.best_trial, counts


def _write_summary(
    cfg: Config,
    name: str,
    best: optuna.trial.FrozenTrial,
    best_params: dict[str, Any],
    counts: dict[str, int],
    run_id: str,
    stopped: str | None = None,
    runners: list[int] | None = None,
    noise: dict[str, Any] | None = None,
) -> Path:
    """search.out: best_params.json (what train takes), the models of the best trial and of
    its `runners` up (what train copies and averages; runners_up/order.json lists those
    kept, best first) and summary.json (the password in the storage URL masked: it is a DVC
    output users commit)."""
    out, kept = Path(cfg.search.out), _kept(cfg, name)
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "best_params.json", best_params)
        if (kept / str(best.number) / SPEC_FILE).exists():  # what `train` copies
            copy_folder(kept / str(best.number), tmp / BEST_MODEL)
        # every trial of the final top was kept when it completed; a search resumed after
        # an earlier summary cleared the kept models may lack some: those are left out
        on_disk = [n for n in runners or [] if (kept / str(n) / SPEC_FILE).exists()]
        for n in on_disk:
            copy_folder(kept / str(n), tmp / RUNNERS_UP / str(n))
        write_json_atomic(tmp / RUNNERS_UP / "order.json", on_disk)
        write_json_atomic(
            tmp / "summary.json",
            {
                "study_name": name,
                "storage": mask(cfg.search.storage),
                "best_value": best.value,
                "best_trial": best.number,
                "runners_up": on_disk,  # the next-best trials train averages in
                "best_params": best_params,
                "counts": counts,
                "fully_evaluated": counts.get("complete", 0),  # configurations run to the end
                "stopped_early": stopped,  # why the study holds fewer trials than asked
                "within_noise": noise,  # the complete trials val cannot tell from the best
                "data_hash": read_manifest(cfg.data.out)["data_hash"],
                "source_sha256": read_source_manifest(cfg.source.out)["sha256"],
                "mlflow_run_id": run_id,
            },
        )
    shutil.rmtree(kept, ignore_errors=True)
    with contextlib.suppress(OSError):
        kept.parent.rmdir()  # when no other study's models wait there
    return out


# -------------------------------------------------------------------- public


def _open_study(cfg: Config, name: str, storage: Any, arm: str) -> optuna.Study:
    """Create or load the study, its metric named and what it is about in its attributes
    (its name is hashes): what optuna-dashboard shows."""
    quiet("optuna")  # not "A new study created ..."
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=make_sampler(cfg.search),
    )
    with warnings.catch_warnings():  # experimental in Optuna 4
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy"])
    study.set_user_attr("data", str(cfg.data.path))
    study.set_user_attr("arm", arm)  # transfer, or the from-scratch baseline's lr search
    study.set_user_attr("source", read_source_manifest(cfg.source.out)["origin"])
    return study


def _search_params(cfg: Config) -> dict[str, Any]:
    """The search's own settings, as its MLflow run's params (the storage password masked)."""
    sc = cfg.search
    return {
        "n_trials": sc.n_trials,
        "sampler": sc.sampler,
        "pruner": sc.pruner,
        "n_workers": cfg.compute.n_workers,
        "cluster": cfg.compute.cluster or "local",
        "storage": mask(sc.storage),
        "space": sc.space.model_dump_json(exclude_none=True),
    }


def _say_evaluated(counts: dict[str, int]) -> None:
    """How many configurations the search really compared: run to the end, or pruned."""
    log.info(
        "%d of %d configuration(s) fully evaluated (%d pruned after their first thaw, where "
        "they were below the median by more than val noise)",
        counts.get("complete", 0),
        counts.get("complete", 0) + counts.get("pruned", 0),
        counts.get("pruned", 0),
    )


def run_search(cfg: Config) -> SearchResult:
    """Run (or resume) the study; write best params; log everything to MLflow. A config
    with ``finetune.init: random`` is the from-scratch arm's search (see baseline.py). A
    new study's first trials are :func:`start_points` (spread over the space), then the
    sampler draws."""
    arm = _arm(cfg)
    num_blocks = read_source_manifest(cfg.source.out)["num_blocks"]
    check_depth(cfg, num_blocks)  # before any trial runs
    check_scheduler(cfg.compute.cluster)  # and before the study and MLflow runs open
    cfg = resolve_depth_range(cfg, num_blocks)  # the default depth range: 0..block count
    sc = cfg.search
    name = study_name(cfg)
    storage = make_storage(sc)
    study = _open_study(cfg, name, storage, arm)
    if not study.get_trials(deepcopy=False):
        for point in start_points(sc):
            study.enqueue_trial(point)
    before = len([t for t in study.get_trials(deepcopy=False) if t.state in FINISHED])
    log.info(
        "study %s in %s: %d finished trial(s), target %d",
        name,
        mask(sc.storage),
        before,
        sc.n_trials,
    )
    mlflow = setup_tracking(cfg.tracking)
    data_hash = read_manifest(cfg.data.out)["data_hash"]
    source = read_source_manifest(cfg.source.out)
    with start_run(
        mlflow,
        run_name=f"{'scratch-' if arm == 'scratch' else ''}search-{name[-12:]}",
        tags={
            "role": "search",
            "arm": arm,
            "study_name": name,
            "data_hash": data_hash,
            "source": source["origin"],
            "source_sha256": source["sha256"],
        },
    ) as parent:
        log_data(mlflow, cfg.data.out, Path(cfg.data.path).name, data_hash, "training")
        mlflow.log_params(_search_params(cfg))
        with labelled("scratch search" if arm == "scratch" else ""):
            _run_trials(cfg, name, parent.info.run_id)
        study = optuna.load_study(study_name=name, storage=storage)
        _say_if_short(study, sc)
        best, counts = _best_trial(study)
        noise = within_noise(study, _val_size(cfg))
        best_params = suggest_to_overrides(best.params)
        mlflow.log_params({f"best.{k}": v for k, v in best_params.items()})
        mlflow.log_metrics(
            {
                "best_val_accuracy": float(best.value or 0.0),
                "fully_evaluated": counts.get("complete", 0),
                "within_val_noise_of_best": len(noise["trials"]),  # the best included
                **{f"trials_{k}": v for k, v in counts.items()},
            }
        )
        mlflow.set_tag("best_trial", str(best.number))
        stopped = no_headroom(study, sc)
        if stopped:
            mlflow.set_tag("stopped_early", stopped)
        log_search_plots(mlflow, study)
    runners = runners_up(study, best, cfg.finetune.ensemble_trials - 1)
    out = _write_summary(
        cfg, name, best, best_params, counts, parent.info.run_id, stopped, runners, noise
    )
    log.info("best trial #%d: val accuracy %.4f with %s", best.number, best.value, best_params)
    _say_evaluated(counts)
    _say_within_noise(noise)
    return SearchResult(
        name, mask(sc.storage), best_params, float(best.value or 0.0), best.number, counts, out
    )


def suggest_to_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna param names -> dotted finetune overrides."""
    return {f"finetune.{k}": v for k, v in params.items()}
