"""The staged fine-tuning loop (DESIGN §4): :func:`finetune` on one screen.

The head starts as the exact linear probe (:mod:`.probe`), whose val score is the floor an
epoch must beat. The plan (:mod:`.plan`) says which blocks thaw in which stage; the thaw
policy (:mod:`.thaw`) adds their param groups; the frozen prefix's output is cached per stage
(:mod:`.cache`); a checkpoint at an epoch's end (every ``checkpoint_every_s``,
:mod:`.checkpoint`) makes a rerun resume bit-exactly. Each stage has its own warm-up +
schedule and early stopping on val; the best weights over all epochs win. Metrics leave
through the ``on_epoch_end`` hook (MLflow, Optuna's pruner): the loop itself logs only its
progress (a bar on a terminal, else one line per epoch).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from transferops.config import FinetuneConfig
from transferops.finetune.balance import class_weights, imbalance
from transferops.finetune.cache import Autocast, StageFeatures, stage_features
from transferops.finetune.checkpoint import (
    RunState,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from transferops.finetune.plan import Stage, lr_factor, stage_plan
from transferops.finetune.probe import ProbeFit, probe_head
from transferops.finetune.thaw import (
    batchnorms,
    make_optimizer,
    set_bn_momentum,
    set_train_mode,
    thaw,
)
from transferops.model.blocks import StagedNet
from transferops.model.inputs import Inputs, Preprocess, fit_width
from transferops.runtime.progress import make_progress, progress_enabled, run_label

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """Outcome of a staged fine-tune (the net holds the best weights)."""

    net: StagedNet
    best_val_accuracy: float
    best_val_loss: float
    unfreeze_depth: int
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    # (group name, base lr) of the optimizer at the start of each stage
    stage_groups: list[list[tuple[str, float]]] = field(default_factory=list)
    # optimizer steps taken per param group (Adam state survives thawing)
    optimizer_steps: dict[str, int] = field(default_factory=dict)
    probe: ProbeFit | None = None  # the exact probe the head started from (head_init probe)
    average: WeightAverage | None = None  # the averaged weights' val score (average_epochs)
    from_probe: bool = False  # no epoch beat the probe beyond noise: the net is the probe


@dataclass
class WeightAverage:
    """The mean of the last epochs' weights, scored on val; `kept` if it beat every epoch."""

    epochs: int
    val_accuracy: float
    val_loss: float
    kept: bool


@dataclass
class Loop:
    """What every epoch of one fine-tune reads and moves: the net, its optimizer, the data,
    the preprocessing, the config, the autocast context and the run's state."""

    net: StagedNet
    opt: torch.optim.Optimizer
    train: Inputs
    val: Inputs
    pre: Preprocess
    cfg: FinetuneConfig
    amp: Autocast
    run: RunState
    class_weight: torch.Tensor | None = None  # per-class loss weights (finetune.class_weight)


def autocast_for(device: torch.device, bf16: bool) -> Autocast:
    """bf16 autocast on `device` when `bf16` (`Preprocess.bf16`: finetune.precision resolved
    for the device and the family); full precision otherwise."""
    if bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def finetune(
    net: StagedNet,
    train: Inputs,
    val: Inputs,
    cfg: FinetuneConfig,
    pre: Preprocess,
    device: torch.device,
    on_epoch_end: EpochHook | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    feature_store: dict[tuple, torch.Tensor] | None = None,
) -> TrainResult:
    """Staged fine-tuning of `net` on `train`, scored on `val`. Returns the best state.

    `feature_store` shares frozen-prefix features between calls on the same data and source
    (the trials of a search); `checkpoint` + `fingerprint` make a rerun resume.
    """
    t0 = time.perf_counter()
    plan = stage_plan(cfg, net.num_blocks)
    pre.place(net, device)
    set_bn_momentum(net, cfg.bn_momentum)  # matters only where statistics are learned
    train, val = train.to(device), val.to(device)
    amp = autocast_for(device, pre.bf16)
    opt = make_optimizer(net, cfg)
    ck = load_checkpoint(checkpoint, fingerprint) if checkpoint else None
    store = feature_store if feature_store is not None else {}
    weight = loss_weights(train, net.head[-1].out_features, cfg, device)
    run, probe = start(net, train, val, pre, cfg, store, amp, ck, weight)
    loop = Loop(net, opt, train, val, pre, cfg, amp, run, weight)

    saved_at = time.perf_counter()

    def end_epoch(rec: dict[str, float]) -> None:
        nonlocal saved_at
        # Checkpoint first: a hook that raises (Optuna pruning) still leaves a resumable run.
        # Not every epoch: 70 MB of weights and optimizer state cost a scratch run on the
        # demo 6% of its time, for runs shorter than the interval that a crash barely dents.
        if checkpoint is not None and time.perf_counter() - saved_at >= cfg.checkpoint_every_s:
            save_checkpoint(checkpoint, fingerprint, net, opt, run)
            saved_at = time.perf_counter()
        if on_epoch_end is not None:
            on_epoch_end(int(rec["epoch"]), rec)

    stage_groups = []
    for stage in plan:
        thaw(net, opt, stage, cfg)
        stage_groups.append([(g["name"], g["base_lr"]) for g in opt.param_groups])
        first_epoch = 0
        if ck and stage.index < ck["stage"]:
            continue  # finished before the checkpoint
        if ck and stage.index == ck["stage"]:
            opt.load_state_dict(ck["opt"])  # the groups thawed so far exist again: same shapes
            if ck["stage_done"]:
                continue
            first_epoch = ck["next_epoch"]
        feats = stage_features(net, train, val, stage.frozen, pre, cfg, store, amp)
        run_stage(loop, stage, first_epoch, feats, end_epoch)
        del feats
        if feature_store is None:
            store.clear()  # free this stage's cache before the next stage builds its own
    net.load_state_dict(run.best_state)
    if run.from_probe:
        log.info(run_label(probe_kept(run)))
    return TrainResult(
        net=net,
        best_val_accuracy=run.best[0],
        best_val_loss=-run.best[1],
        unfreeze_depth=cfg.unfreeze_depth,
        epochs_run=len(run.history),
        seconds=time.perf_counter() - t0,
        history=run.history,
        resumed_from=len(ck["history"]) if ck else None,
        stage_groups=stage_groups,
        optimizer_steps={g["name"]: _steps(opt, g) for g in opt.param_groups},
        probe=probe,
        average=WeightAverage(**run.average) if run.average else None,
        from_probe=run.from_probe,
    )


def probe_kept(run: RunState) -> str:
    """Why the model is the exact probe: no epoch beat it beyond noise."""
    return (
        f"no epoch beat the exact probe on val (accuracy {run.best[0]:.4f}) by more than "
        f"{run.beat_by} paired standard error(s) (finetune.beat_probe_by): the model is the "
        "exact probe"
    )


def loss_weights(
    train: Inputs, num_classes: int, cfg: FinetuneConfig, device: torch.device
) -> torch.Tensor | None:
    """The per-class loss weights finetune.class_weight asks for (said in the log), or None."""
    weight = class_weights(train.y, num_classes, cfg.class_weight)
    if weight is None:
        return None
    log.info(
        "class-balanced loss: largest class %.1fx the smallest (finetune.class_weight %s)",
        imbalance(train.y, num_classes),
        cfg.class_weight,
    )
    return weight.to(device)


def start(
    net: StagedNet,
    train: Inputs,
    val: Inputs,
    pre: Preprocess,
    cfg: FinetuneConfig,
    store: dict,
    amp: Autocast,
    ck: dict | None,
    weight: torch.Tensor | None = None,
) -> tuple[RunState, ProbeFit | None]:
    """Where training starts: the checkpoint's state, or the exact probe's head, whose val
    score is then the floor an epoch must beat (head_init probe)."""
    if ck:
        log.info("resuming: stage %d, epoch %d", ck["stage"], ck["next_epoch"])
        return restore(net, ck), None  # the checkpoint already holds the probed head
    probe = None
    if cfg.head_init == "probe":
        bs = train.inference_batch(cfg.batch_size * 2, pre.size)
        probe = probe_head(net, train, val, pre, bs, store, amp, weight)
    run = RunState.fresh(net)
    if probe is not None:
        run.best = (probe.val_accuracy, -probe.val_loss)
        run.probe_correct, run.beat_by, run.from_probe = probe.val_correct, cfg.beat_probe_by, True
    return run, probe


def run_stage(
    loop: Loop,
    stage: Stage,
    first_epoch: int,
    feats: StageFeatures | None,
    end_epoch: Callable[[dict[str, float]], None],
) -> None:
    """The epochs of one stage, until its last epoch or early stopping on val accuracy."""
    net, run, cfg = loop.net, loop.run, loop.cfg
    steps = math.ceil(len(loop.train) / cfg.batch_size)
    stage_best, bad = -1.0, 0
    with make_progress() as prog:
        task = prog.add_task(
            run_label(f"{stage}{', cached' if feats else ''}"),
            total=(stage.epochs - first_epoch) * steps,
            info="",
        )
        for epoch in range(first_epoch, stage.epochs):
            train_loss = train_epoch(loop, stage, epoch, feats, lambda: prog.advance(task))
            val_acc, val_loss, val_correct = validate(loop, stage, feats)
            rec = {
                "epoch": len(run.history),
                "stage": stage.index,
                "depth": stage.depth,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
            }
            run.history.append(rec)
            prog.update(task, info=f"loss {train_loss:.3f} val_acc {val_acc:.3f}")
            if not progress_enabled():  # no bar (a log file, CI, a worker): one line per epoch
                log.info(
                    run_label(f"{stage} epoch {epoch}: loss {train_loss:.3f} val {val_acc:.4f}")
                )
            run.improve(net, val_acc, val_loss, val_correct)
            if epoch >= stage.averaged_from:
                run.add_to_average(net)
            stage_best, bad = (val_acc, 0) if val_acc > stage_best else (stage_best, bad + 1)
            patience = cfg.early_stopping_patience
            run.stage, run.next_epoch = stage.index, epoch + 1
            run.stage_done = epoch == stage.epochs - 1 or (patience is not None and bad >= patience)
            if run.stage_done and stage.last:
                keep_average(loop, stage, feats)
            end_epoch(rec)  # checkpoint + hooks; may raise (Optuna pruning the trial)
            if run.stage_done:
                break


def keep_average(loop: Loop, last: Stage, feats: StageFeatures | None) -> None:
    """Score the mean weights of the averaged epochs on val when the last stage ends; they
    become the best state if they beat every epoch (accuracy, then loss). On 200 digits the
    mean beat the best epoch's test accuracy in 8 of 9 runs, +2.1 points (bench/RESULTS.md):
    it sits in a flatter region than any one epoch's weights."""
    net, run = loop.net, loop.run
    if run.avg_count < 2:
        return
    live = copy.deepcopy(net.state_dict())  # the trainer's weights: the checkpoint keeps them
    net.load_state_dict(run.avg_state)
    # precise BN too: the mean of the epochs' statistics is not the mean weights' statistics
    acc, loss, correct = validate(loop, last, feats)
    best = run.best[0]
    kept = run.improve(net, acc, loss, correct)
    net.load_state_dict(live)
    run.average = asdict(WeightAverage(run.avg_count, acc, loss, kept))
    log.info(
        run_label(
            f"weights averaged over the last {run.avg_count} epochs: val {acc:.4f} "
            f"(best so far {best:.4f}): {'kept' if kept else 'not kept'}"
        )
    )


def validate(
    loop: Loop, stage: Stage, feats: StageFeatures | None
) -> tuple[float, float, torch.Tensor]:
    """(accuracy, loss, per-example correctness) on val of the weights in the net, with
    thawed blocks' BatchNorm statistics first recomputed over train where they are learned
    (bn_recalibrate)."""
    net, cfg, pre, amp, val = loop.net, loop.cfg, loop.pre, loop.amp, loop.val
    if cfg.bn_mode == "train" and cfg.bn_recalibrate and stage.depth > 0:
        cached = feats.train_views[0] if feats else None
        recalibrate_bn(net, stage.depth, loop.train, cached, pre, cfg.batch_size * 2, amp)
    bs = val.inference_batch(cfg.batch_size * 2, pre.size)
    return val_scores(net, val, feats, stage.frozen, pre, bs, amp)


def train_epoch(
    loop: Loop,
    stage: Stage,
    epoch: int,
    feats: StageFeatures | None,
    on_step: Callable[[], None],
) -> float:
    """One pass over train in a seeded order; returns the mean training loss."""
    net, opt, train, pre, cfg, amp = loop.net, loop.opt, loop.train, loop.pre, loop.cfg, loop.amp
    set_train_mode(net, stage.depth, cfg.bn_mode)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage.index * 1009 + epoch)
    # CPU indices: batch() cuts text widths to the batch's longest, with no host sync
    perm = train.train_order(torch.randperm(len(train), generator=gen), cfg.batch_size)
    steps = math.ceil(len(train) / cfg.batch_size)
    loss_sum = torch.zeros((), device=train.y.device)  # on the device: no host sync per step
    for b in range(steps):
        idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        factor = lr_factor(epoch * steps + b, stage.epochs * steps, cfg)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        x, ctx = train.batch(idx)
        with amp():
            if feats is not None:
                h = fit_width(feats.train_batch(epoch, idx), ctx)
            else:
                x = pre(x, True, gen)
                with torch.no_grad():  # the frozen prefix needs no graph
                    h = net.encode(x, stage.frozen, ctx)
            logits = net.decode(h, stage.frozen, ctx).float()
            loss = F.cross_entropy(logits, train.y[idx], weight=loop.class_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(idx)
        on_step()
    return float(loss_sum) / len(train)


@torch.no_grad()
def val_scores(
    net: StagedNet,
    data: Inputs,
    feats: StageFeatures | None,
    frozen: int,
    pre: Preprocess,
    bs: int,
    amp: Autocast,
) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean loss, per-example correctness) on `data`, from the cached val features
    when there are some."""
    net.eval()
    loss_sum = torch.zeros((), device=data.y.device)
    correct = []
    for i in range(0, len(data), bs):
        x, ctx = data.batch(slice(i, i + bs))
        y = data.y[i : i + bs]
        with amp():
            if feats is not None:
                logits = net.decode(fit_width(feats.val[i : i + bs], ctx), frozen, ctx)
            else:
                logits = net(pre(x, False, None), ctx)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct.append(logits.argmax(1) == y)
    n = max(1, len(data))
    right = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    # one host sync per evaluation
    return float(right.sum()) / n, float(loss_sum) / n, right


@torch.no_grad()
def recalibrate_bn(
    net: StagedNet,
    depth: int,
    data: Inputs,
    feats: torch.Tensor | None,
    pre: Preprocess,
    bs: int,
    amp: Autocast,
) -> None:
    """Precise BN: thawed blocks' BatchNorm statistics = the average of per-batch statistics
    over one pass of `data` (exactly the data mean when batches are equal in size)."""
    frozen = net.num_blocks - depth
    bns = [m for b in net.blocks[frozen:] for m in batchnorms(b)]
    if not bns:
        return
    net.eval()
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    for i in range(0, len(data), bs):
        x, ctx = data.batch(slice(i, i + bs))
        with amp():
            h = (
                fit_width(feats[i : i + bs], ctx)
                if feats is not None
                else net.encode(pre(x, False, None), frozen, ctx)
            )
            net.run_blocks(h, frozen, net.num_blocks, ctx)
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum


def _steps(opt: torch.optim.Optimizer, group: dict) -> int:
    step = opt.state.get(group["params"][0], {}).get("step")
    return int(step) if step is not None else 0
