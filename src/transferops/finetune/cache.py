"""The feature cache: the frozen prefix's output, computed once per stage.

Frozen blocks are in eval mode and hold fixed weights, so within a stage their output for an
example never changes: compute it once and train the thawed top from it. Exact without
augmentation; with augmentation a fixed number of augmented views is cached and the epochs
cycle through them. A linear probe over E epochs then costs about one forward pass, not E.

A ``store`` shared between calls (the trials of a search, the seeds of a baseline) reuses the
features of a prefix across runs. That is exact too: blocks thaw top-down and never freeze
again, so a frozen prefix always holds the source's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transferops.config import FinetuneConfig
from transferops.model.blocks import StagedNet
from transferops.model.inputs import Inputs, Preprocess

Autocast = Callable[[], AbstractContextManager]


@dataclass
class StageFeatures:
    """Cached outputs of blocks[:frozen] for a stage: train views and val."""

    frozen: int
    train_views: list[torch.Tensor]
    val: torch.Tensor

    def train_batch(self, epoch: int, idx: torch.Tensor) -> torch.Tensor:
        """The cached view for `epoch` of the examples at `idx`."""
        return self.train_views[epoch % len(self.train_views)][idx]


@torch.no_grad()
def encode_prefix(
    net: StagedNet,
    data: Inputs,
    prefix: int,
    pre: Preprocess,
    batch_size: int,
    train_aug: bool = False,
    gen: torch.Generator | None = None,
    amp: Autocast = nullcontext,
) -> torch.Tensor:
    """``net.encode(x, prefix)`` for every example, in batches, with the prefix in eval mode.
    Texts go in length order (little padding per batch) and come out padded to the split's
    width, in the original order."""
    was = [b.training for b in net.blocks[:prefix]]
    for b in net.blocks[:prefix]:
        b.eval()
    order = data.inference_order()
    outs = []
    for i in range(0, len(data), batch_size):
        x, ctx = data.batch(order[i : i + batch_size])
        x = pre(x, train_aug, gen)
        with amp():
            h = net.encode(x, prefix, ctx).float()
        if ctx is not None and h.dim() == 3:  # back to the split's width for one tensor
            h = F.pad(h, (0, 0, 0, data.x.shape[1] - h.shape[1]))
        outs.append(h)
    for b, w in zip(net.blocks[:prefix], was, strict=True):
        b.train(w)
    return torch.cat(outs)[torch.argsort(order)]


def _fits(
    net: StagedNet,
    train: Inputs,
    val: Inputs,
    prefix: int,
    pre: Preprocess,
    n_views: int,
    cfg: FinetuneConfig,
    amp: Autocast,
) -> bool:
    """Whether `n_views` train views + val of this prefix fit feature_cache_max_mb (stored as
    float32 whatever the autocast: measured on two examples)."""
    two = Inputs(train.x[:2], train.y[:2], train.ctx[:2] if train.ctx is not None else None)
    per_example = encode_prefix(net, two, prefix, pre, 2, amp=amp)[0].numel() * 4
    n_examples = len(train) * n_views + len(val)
    return per_example * n_examples <= cfg.feature_cache_max_mb * 2**20


def stage_features(
    net: StagedNet,
    train: Inputs,
    val: Inputs,
    frozen: int,
    pre: Preprocess,
    cfg: FinetuneConfig,
    store: dict[tuple, torch.Tensor] | None,
    amp: Autocast,
) -> StageFeatures | None:
    """The cache for a stage whose bottom `frozen` blocks are frozen, or None when there is
    nothing frozen, the cache is off, or it would not fit its memory budget."""
    aug = pre.augment != "none"
    n_views = cfg.cached_views if aug else 1
    if (
        not cfg.feature_cache
        or frozen == 0
        or not _fits(net, train, val, frozen, pre, n_views, cfg, amp)
    ):
        return None
    store = store if store is not None else {}
    bs = train.inference_batch(cfg.batch_size * 2, pre.size)
    views = []
    for v in range(n_views):
        key = ("train", frozen, pre.augment, cfg.seed if aug else None, v)
        if key not in store:
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + frozen * 131 + v)
            store[key] = encode_prefix(net, train, frozen, pre, bs, aug, gen, amp)
        views.append(store[key])
    if ("val", frozen) not in store:
        store[("val", frozen)] = encode_prefix(net, val, frozen, pre, bs, False, None, amp)
    return StageFeatures(frozen, views, store[("val", frozen)])
