"""The staged fine-tuning loop (DESIGN §4), top to bottom in one file.

Stage 0 trains the new head on the frozen backbone; each later stage thaws the next
``blocks_per_stage`` blocks from the top until ``unfreeze_depth``. Thawed block j (j = 1 is
the top block) trains at ``lr * layer_decay**j``; the optimizer gains a param group per block
as it thaws and keeps the Adam state of groups already training. Each stage has its own
warm-up + schedule and early stopping on val.

Frozen blocks are always in eval mode (BatchNorm statistics and dropout frozen), so their
output does not change within a stage: it is computed once (the *feature cache*) and the
thawed top trains from it. Without augmentation this is exact; with augmentation a fixed
number of augmented views is cached.

A checkpoint is written atomically after every epoch; ``train`` resumes from it when the run
fingerprint (data, source, params) matches, and the result equals an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transferops.config import FinetuneConfig
from transferops.finetune.blocks import StagedNet
from transferops.progress import make_progress

log = logging.getLogger(__name__)

EpochHook = Callable[[int, dict[str, float]], None]


# ------------------------------------------------------------------ data on device


@dataclass
class Inputs:
    """One split as tensors: images uint8 [N,3,H,W] or token ids [N,L] (+ mask), labels [N]."""

    x: torch.Tensor
    y: torch.Tensor
    ctx: torch.Tensor | None = None  # attention mask for text

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> Inputs:
        ctx = self.ctx.to(device) if self.ctx is not None else None
        return Inputs(self.x.to(device), self.y.to(device), ctx)


@dataclass
class Preprocess:
    """uint8 images -> normalised float on the training device, with optional augmentation."""

    modality: str
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    augment: str = "none"
    channels_last: bool = False

    def __call__(self, x: torch.Tensor, train: bool, gen: torch.Generator | None) -> torch.Tensor:
        if self.modality != "image":
            return x
        x = x.float().div_(255.0)
        if train and self.augment == "flip_crop":
            x = _flip_crop(x, gen)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _flip_crop(x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip + random crop with 1/8 padding, vectorised on the device."""
    n, _, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, generator=gen, device="cpu").to(dev) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    iy = (torch.arange(h, device=dev).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1)
    ix = (torch.arange(w, device=dev).view(1, w) + dx.view(n, 1)).view(n, 1, 1, w)
    c = x.shape[1]
    return xp[
        torch.arange(n, device=dev).view(n, 1, 1, 1),
        torch.arange(c, device=dev).view(1, c, 1, 1),
        iy,
        ix,
    ]


# ------------------------------------------------------------------- the plan


def stage_depths(unfreeze_depth: int, blocks_per_stage: int) -> list[int]:
    """Trainable depth of each stage: [0, b, 2b, ..., unfreeze_depth]."""
    depths = [0]
    while depths[-1] < unfreeze_depth:
        depths.append(min(depths[-1] + blocks_per_stage, unfreeze_depth))
    return depths


def set_trainable(net: StagedNet, depth: int) -> None:
    """Head and the top `depth` blocks trainable; everything below frozen."""
    first = net.num_blocks - depth
    for i, b in enumerate(net.blocks):
        b.requires_grad_(i >= first)
    net.head.requires_grad_(True)


def set_train_mode(net: StagedNet, depth: int, bn_mode: str = "train") -> None:
    """Train mode for the thawed top and head; frozen blocks stay in eval (BN frozen).

    With bn_mode "frozen", BatchNorm layers of thawed blocks also keep their running
    statistics (their affine parameters still train).
    """
    net.train()
    for b in net.blocks[: net.num_blocks - depth]:
        b.eval()
    if bn_mode == "frozen":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def block_param_group(net: StagedNet, j: int, cfg: FinetuneConfig) -> dict[str, Any]:
    """Param group of the j-th block from the top (j >= 1): lr * layer_decay**j."""
    idx = net.num_blocks - j
    lr = cfg.lr * cfg.layer_decay**j
    return {
        "params": [p for p in net.blocks[idx].parameters()],
        "lr": lr,
        "base_lr": lr,
        "name": net.block_names[idx],
        "weight_decay": cfg.weight_decay,
    }


def make_optimizer(net: StagedNet, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW holding the head group; blocks join with `block_param_group` as they thaw."""
    head = {
        "params": list(net.head.parameters()),
        "lr": cfg.lr,
        "base_lr": cfg.lr,
        "name": "head",
        "weight_decay": cfg.weight_decay,
    }
    return torch.optim.AdamW([head])


def lr_factor(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Multiplier of each group's base LR at `step` of a stage with `total` steps."""
    warm_frac = max(cfg.warmup_frac, 0.3) if cfg.schedule == "onecycle" else cfg.warmup_frac
    warm = int(warm_frac * total)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    p = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))


# --------------------------------------------------------------- feature cache


@torch.no_grad()
def encode_prefix(
    net: StagedNet,
    data: Inputs,
    prefix: int,
    pre: Preprocess,
    batch_size: int,
    train_aug: bool = False,
    gen: torch.Generator | None = None,
    amp: Any = nullcontext,
) -> torch.Tensor:
    """Outputs of the frozen blocks[:prefix] for every example (pooled when prefix == all)."""
    was = [b.training for b in net.blocks[:prefix]]
    for b in net.blocks[:prefix]:
        b.eval()
    outs = []
    for i in range(0, len(data), batch_size):
        x = pre(data.x[i : i + batch_size], train_aug, gen)
        ctx = data.ctx[i : i + batch_size] if data.ctx is not None else None
        with amp():
            h = net.run_blocks(x, 0, prefix, ctx)
            if prefix == net.num_blocks:
                h = net.pool(h, ctx)
        outs.append(h.float())
    for b, w in zip(net.blocks[:prefix], was, strict=True):
        b.train(w)
    return torch.cat(outs)


def _cache_bytes(net: StagedNet, data: Inputs, prefix: int, pre: Preprocess) -> int:
    probe = Inputs(data.x[:2], data.y[:2], data.ctx[:2] if data.ctx is not None else None)
    h = encode_prefix(net, probe, prefix, pre, 2)
    return int(h[0].numel() * 4 * len(data))


# ----------------------------------------------------------------- the loop


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


def _evaluate(
    net: StagedNet,
    feats: torch.Tensor | None,
    data: Inputs,
    start: int,
    pre: Preprocess,
    bs: int,
    amp: Any,
) -> tuple[float, float]:
    net.eval()
    loss_sum = torch.zeros((), device=data.y.device)
    correct = torch.zeros((), device=data.y.device, dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(data), bs):
            ctx = data.ctx[i : i + bs] if data.ctx is not None else None
            y = data.y[i : i + bs]
            with amp():
                if feats is not None:
                    logits = net.forward_from(feats[i : i + bs], start, ctx)
                else:
                    logits = net(pre(data.x[i : i + bs], False, None), ctx)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    n = max(1, len(data))
    return float(correct) / n, float(loss_sum) / n  # one host sync per evaluation


@torch.no_grad()
def recalibrate_bn(
    net: StagedNet,
    depth: int,
    data: Inputs,
    feats: torch.Tensor | None,
    pre: Preprocess,
    bs: int,
    amp: Any,
) -> None:
    """Precise BN: thawed blocks' BatchNorm statistics = the average of per-batch statistics
    over one pass of `data` (exactly the data mean when batches are equal in size)."""
    bns = [
        m
        for b in net.blocks[net.num_blocks - depth :]
        for m in b.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if not bns:
        return
    net.eval()
    saved = []
    for m in bns:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    prefix = net.num_blocks - depth
    for i in range(0, len(data), bs):
        ctx = data.ctx[i : i + bs] if data.ctx is not None else None
        with amp():
            if feats is not None:
                h = feats[i : i + bs]
            else:
                h = net.run_blocks(pre(data.x[i : i + bs], False, None), 0, prefix, ctx)
            net.run_blocks(h, prefix, net.num_blocks, ctx)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if ck.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is for another run configuration: starting fresh", path)
        return None
    return ck


def _log_mlflow(metrics: dict[str, float], step: int) -> None:
    mlflow = sys.modules.get("mlflow")  # only when the caller uses MLflow (no import cost)
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_metrics(metrics, step=step)


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
    (e.g. the trials of a search). That is exact: a frozen prefix always holds the source's
    weights, since blocks thaw top-down and never freeze again.
    """
    t0 = time.perf_counter()
    depth = min(cfg.unfreeze_depth, net.num_blocks)
    depths = stage_depths(depth, cfg.blocks_per_stage)
    net.to(device)
    if cfg.bn_momentum is not None:  # only matters where statistics are learned (bn_mode train)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    if pre.channels_last:
        net.to(memory_format=torch.channels_last)
    train, val = train.to(device), val.to(device)
    use_amp = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext

    opt = make_optimizer(net, cfg)
    history: list[dict[str, float]] = []
    best = (-1.0, -math.inf)  # (val accuracy, -val loss)
    best_state = copy.deepcopy(net.state_dict())
    resume = _load_checkpoint(checkpoint, fingerprint) if checkpoint else None
    start_stage, start_epoch = 0, 0
    resumed_from = None
    if resume is not None:
        net.load_state_dict(resume["net"])
        history, best_state = list(resume["history"]), resume["best_state"]
        resumed_from = len(history)
        best = (resume["best_acc"], resume["best_neg_loss"])
        start_stage, start_epoch = resume["stage"], resume["next_epoch"]
        torch.set_rng_state(resume["rng"])
        log.info("resuming from %s: stage %d, epoch %d", checkpoint, start_stage, start_epoch)
    global_epoch = len(history)
    stage_groups: list[list[tuple[str, float]]] = []

    for stage, d in enumerate(depths):
        prev = depths[stage - 1] if stage else 0
        for j in range(prev + 1, d + 1):  # blocks that thaw in this stage join the optimizer
            opt.add_param_group(block_param_group(net, j, cfg))
        stage_groups.append([(g["name"], g["base_lr"]) for g in opt.param_groups])
        if stage < start_stage:
            continue
        if resume is not None and stage == start_stage:
            opt.load_state_dict(resume["opt"])
        epochs = cfg.epochs_for_stage(stage)
        first_epoch = start_epoch if stage == start_stage else 0
        if resume is not None and stage == start_stage and resume["stage_done"]:
            continue
        set_trainable(net, d)
        prefix = net.num_blocks - d
        start = prefix if prefix < net.num_blocks else net.num_blocks + 1

        # Feature cache of the frozen prefix (train views + val), when it fits the budget.
        aug = pre.augment != "none"
        n_views = cfg.cached_views if aug else 1
        use_cache = (
            cfg.feature_cache
            and prefix > 0
            and (
                _cache_bytes(net, train, prefix, pre) * (n_views + len(val) / max(1, len(train)))
                <= cfg.feature_cache_max_mb * 2**20
            )
        )
        train_views: list[torch.Tensor] = []
        val_feats = None
        if use_cache:
            store = feature_store if feature_store is not None else {}
            for v in range(n_views):
                key = ("train", prefix, pre.augment, cfg.seed if aug else None, v)
                if key not in store:
                    g = torch.Generator().manual_seed(cfg.seed * 7919 + prefix * 131 + v)
                    store[key] = encode_prefix(
                        net, train, prefix, pre, cfg.batch_size * 2, aug, g, amp
                    )
                train_views.append(store[key])
            vkey = ("val", prefix)
            if vkey not in store:
                store[vkey] = encode_prefix(
                    net, val, prefix, pre, cfg.batch_size * 2, False, None, amp
                )
            val_feats = store[vkey]

        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = epochs * steps_per_epoch
        stage_best, bad = -1.0, 0
        stage_done = False
        with make_progress() as prog:
            task = prog.add_task(
                f"stage {stage} (depth {d}{', cached' if use_cache else ''})",
                total=(epochs - first_epoch) * steps_per_epoch,
                info="",
            )
            for epoch in range(first_epoch, epochs):
                set_train_mode(net, d, cfg.bn_mode)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + stage * 1009 + epoch)
                perm = torch.randperm(len(train), generator=gen).to(device)
                loss_sum = torch.zeros((), device=device)
                for b in range(steps_per_epoch):
                    idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                    f = lr_factor(epoch * steps_per_epoch + b, total, cfg)
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * f
                    ctx = train.ctx[idx] if train.ctx is not None else None
                    with amp():
                        if use_cache:
                            h = train_views[epoch % n_views][idx]
                        else:
                            h = pre(train.x[idx], True, gen)
                            with torch.no_grad():
                                h = net.run_blocks(h, 0, prefix, ctx)
                                if prefix == net.num_blocks:
                                    h = net.pool(h, ctx)
                        logits = net.forward_from(h, start, ctx)
                        loss = F.cross_entropy(logits.float(), train.y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach() * len(idx)
                    prog.advance(task)
                if cfg.bn_mode == "train" and cfg.bn_recalibrate and d > 0:
                    feats = train_views[0] if use_cache else None
                    recalibrate_bn(net, d, train, feats, pre, cfg.batch_size * 2, amp)
                va, vl = _evaluate(net, val_feats, val, start, pre, cfg.batch_size * 2, amp)
                tl = float(loss_sum) / len(train)
                rec = {
                    "epoch": global_epoch,
                    "stage": stage,
                    "depth": d,
                    "train_loss": tl,
                    "val_loss": vl,
                    "val_accuracy": va,
                }
                history.append(rec)
                prog.update(task, info=f"loss {tl:.3f} val_acc {va:.3f}")
                if (va, -vl) > best:
                    best = (va, -vl)
                    best_state = copy.deepcopy(net.state_dict())
                if va > stage_best:
                    stage_best, bad = va, 0
                else:
                    bad += 1
                stage_done = epoch == epochs - 1 or (
                    cfg.early_stopping_patience is not None and bad >= cfg.early_stopping_patience
                )
                if checkpoint is not None:
                    _save_checkpoint(
                        checkpoint,
                        {
                            "fingerprint": fingerprint,
                            "stage": stage,
                            "next_epoch": epoch + 1,
                            "stage_done": stage_done,
                            "net": net.state_dict(),
                            "opt": opt.state_dict(),
                            "best_state": best_state,
                            "best_acc": best[0],
                            "best_neg_loss": best[1],
                            "history": history,
                            "rng": torch.get_rng_state(),
                        },
                    )
                _log_mlflow({k: v for k, v in rec.items() if k != "epoch"}, global_epoch)
                if on_epoch_end is not None:
                    on_epoch_end(global_epoch, rec)
                global_epoch += 1
                if stage_done:
                    break
        del train_views, val_feats

    net.load_state_dict(best_state)
    steps = {}
    for g in opt.param_groups:
        st = opt.state.get(g["params"][0], {}).get("step")
        steps[g["name"]] = int(st) if st is not None else 0
    return TrainResult(
        net=net,
        best_val_accuracy=best[0],
        best_val_loss=-best[1],
        unfreeze_depth=depth,
        epochs_run=len(history),
        seconds=time.perf_counter() - t0,
        history=history,
        resumed_from=resumed_from,
        stage_groups=stage_groups,
        optimizer_steps=steps,
    )
