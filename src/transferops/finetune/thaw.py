"""Freezing and thawing (Lightning's ``BaseFinetuning``: freeze, make_trainable,
unfreeze_and_add_param_group), and the thaw policy the loop calls at each stage.

Thawed block j from the top (j = 1 is the top block) trains at
``lr * block_lr_scale * layer_decay**j`` (the scale a fact of the model family): the
optimizer gains a param group per block as it thaws and keeps the Adam state of the groups
already training. Frozen blocks stay in eval mode, so their BatchNorm statistics and dropout
are fixed and their output is the same every epoch (what the feature cache relies on).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transferops.config import FinetuneConfig
from transferops.finetune.adapters import is_adapter
from transferops.finetune.plan import Stage
from transferops.model.blocks import StagedNet
from transferops.model.families import family


def batchnorms(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers in `module`."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def make_trainable(net: StagedNet, depth: int, adapter: str = "none") -> None:
    """Head and the top `depth` blocks trainable (only their adapters with LoRA);
    everything below frozen."""
    first = net.num_blocks - depth
    for i, b in enumerate(net.blocks):
        if adapter == "lora":
            for name, p in b.named_parameters():
                p.requires_grad_(i >= first and is_adapter(name))
        else:
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
        for m in batchnorms(net):
            m.eval()


def set_bn_momentum(net: nn.Module, momentum: float | None) -> None:
    """Momentum of learned BatchNorm statistics (None keeps the model's own)."""
    if momentum is not None:
        for m in batchnorms(net):
            m.momentum = momentum


def param_group(name: str, module: nn.Module, lr: float, cfg: FinetuneConfig) -> dict[str, Any]:
    """An optimizer param group; `base_lr` is what the schedule scales each step."""
    params = list(module.parameters())
    return {
        "params": params,
        "lr": lr,
        "base_lr": lr,
        "name": name,
        "weight_decay": cfg.weight_decay,
    }


def make_optimizer(net: StagedNet, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW holding the head; blocks join with :func:`unfreeze_and_add_param_group`."""
    return torch.optim.AdamW([param_group("head", net.head, cfg.lr, cfg)])


def block_lr_scale(cfg: FinetuneConfig, family_name: str) -> float:
    """The thawed blocks' LR relative to the head's: finetune.block_lr_scale, or for auto
    the family's (the table's fact), except 1 for a random init (no pretrained features to
    keep) and for LoRA adapters (they start at zero and train at a head-sized LR)."""
    if cfg.block_lr_scale != "auto":
        return cfg.block_lr_scale
    if cfg.init == "random" or cfg.adapter == "lora":
        return 1.0
    return family(family_name).block_lr_scale


def unfreeze_and_add_param_group(
    net: StagedNet, opt: torch.optim.Optimizer, j: int, cfg: FinetuneConfig
) -> None:
    """Block j from the top joins the optimizer at ``lr * block_lr_scale * layer_decay**j``."""
    i = net.num_blocks - j
    lr = cfg.lr * block_lr_scale(cfg, net.family) * cfg.layer_decay**j
    opt.add_param_group(param_group(net.block_names[i], net.blocks[i], lr, cfg))


def thaw(net: StagedNet, opt: torch.optim.Optimizer, stage: Stage, cfg: FinetuneConfig) -> None:
    """The thaw policy, called at the start of every stage (also stages a resume skips, so
    the optimizer has the groups its saved state refers to)."""
    for j in stage.thaws:
        unfreeze_and_add_param_group(net, opt, j, cfg)
    make_trainable(net, stage.depth, cfg.adapter)
