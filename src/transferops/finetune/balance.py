"""Class weights for imbalanced training data: no class silently outvoted.

With ``finetune.class_weight: balanced`` every class contributes the same total weight to the
training loss (sklearn's "balanced": w_c = n / (K * n_c)); the exact probe and the fine-tuned
layers use the same weights (the classical baseline on pixels / TF-IDF keeps sklearn's
defaults, unweighted). ``auto`` turns them on only when the largest training class has at least
:data:`IMBALANCE_RATIO` times the examples of the smallest. Measured with the exact probe
(bench/balance.py, bench/RESULTS.md "Class-balanced loss"): on long tails cut from a balanced
set, 2x changed nothing, 4x / 8x / 16x gained +0.9 / +1.5 / +2.8 test points and +1.6 / +8.0 /
+12.5 points of the worst class's recall; on clip-art's own 7x imbalance (an imbalanced test
split too) the worst recall rose 5.9 points and balanced accuracy 1.7, while plain accuracy
fell 2.6: weighting trades the large classes' accuracy for the small ones'. ``none`` keeps
plain accuracy when that is what counts.
"""

from __future__ import annotations

import torch

IMBALANCE_RATIO = 4.0


def imbalance(y: torch.Tensor, num_classes: int) -> float:
    """Largest over smallest class count among the classes present in `y` (1.0 if balanced)."""
    counts = torch.bincount(y.cpu(), minlength=num_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def class_weights(y: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor | None:
    """Per-class loss weights (mean 1 over the training examples), or None for plain loss.

    `mode`: ``none`` | ``balanced`` | ``auto`` (balanced from :data:`IMBALANCE_RATIO` up). A
    class absent from `y` gets weight 0 (it has no examples to weigh)."""
    if mode == "none" or (mode == "auto" and imbalance(y, num_classes) < IMBALANCE_RATIO):
        return None
    counts = torch.bincount(y.cpu(), minlength=num_classes).double()
    present = counts > 0
    w = torch.zeros(num_classes, dtype=torch.float64)
    w[present] = len(y) / (int(present.sum()) * counts[present])
    return w.float()
