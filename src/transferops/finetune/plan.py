"""The stage plan, built once before training: which blocks thaw when, for how many epochs.

Stage 0 trains the new head on the frozen backbone; each later stage thaws the next
``blocks_per_stage`` blocks from the top until ``unfreeze_depth``. The plan is what the loop
runs, what the progress bars name, and what the baselines and the search budget count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transferops.config import FinetuneConfig, depth_problem
from transferops.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """One stage: the head and the top `depth` blocks train for up to `epochs` epochs."""

    index: int
    depth: int
    thaws: tuple[int, ...]  # blocks joining the optimizer now, as j from the top (1 = top)
    epochs: int
    frozen: int  # blocks below the trainable top: their output can be cached
    averaged_from: int  # this stage's epochs from here on join the weight average
    last: bool  # the plan's last stage: the average is scored when it ends

    def __str__(self) -> str:
        return f"stage {self.index} (depth {self.depth})"


def stage_depths(unfreeze_depth: int, blocks_per_stage: int) -> list[int]:
    """Trainable depth of each stage: [0, b, 2b, ..., unfreeze_depth]."""
    depths = [0]
    while depths[-1] < unfreeze_depth:
        depths.append(min(depths[-1] + blocks_per_stage, unfreeze_depth))
    return depths


def stage_plan(cfg: FinetuneConfig, num_blocks: int) -> list[Stage]:
    """The stages of a fine-tune of a `num_blocks`-block backbone; refuses a deeper depth."""
    problem = depth_problem("finetune.unfreeze_depth is", cfg.unfreeze_depth, num_blocks)
    if problem:
        raise ConfigError(problem)
    depths = stage_depths(cfg.unfreeze_depth, cfg.blocks_per_stage)
    epochs = [cfg.epochs_for_stage(i) for i in range(len(depths))]
    # finetune.average_epochs counts back from the plan's last epoch, across stages
    after = [sum(epochs[i + 1 :]) for i in range(len(epochs))]
    return [
        Stage(
            i,
            d,
            tuple(range(prev + 1, d + 1)),
            epochs[i],
            num_blocks - d,
            min(epochs[i], max(0, epochs[i] + after[i] - cfg.average_epochs)),
            i == len(depths) - 1,
        )
        for i, (prev, d) in enumerate(zip([0, *depths], depths, strict=False))
    ]


def total_epochs(cfg: FinetuneConfig, num_blocks: int) -> int:
    """Epochs of the whole plan when no stage stops early (the budget baselines get)."""
    return sum(s.epochs for s in stage_plan(cfg, num_blocks))


def lr_factor(step: int, total: int, cfg: FinetuneConfig) -> float:
    """Multiplier of each group's base LR at `step` of a stage with `total` steps:
    linear warm-up, then cosine decay (or constant)."""
    warm_frac = max(cfg.warmup_frac, 0.3) if cfg.schedule == "onecycle" else cfg.warmup_frac
    warm = int(warm_frac * total)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    p = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(p, 1.0)))
