"""The exact linear probe: the cheapest strong candidate, and the head fine-tuning starts from.

The backbone's pooled features are computed once (the fully frozen prefix of the feature
cache); a multinomial logistic regression is fitted on them exactly (L-BFGS), with its
regularisation picked on val. That head is loaded before any block thaws (linear probing
then fine-tuning, LP-FT: Kumar et al., ICLR 2022): a random head's large early gradients
would otherwise distort the pretrained features. Its val score is also the floor: an epoch
of fine-tuning is kept only if it beats the probe on val (by more than
``finetune.beat_probe_by`` standard errors of the paired per-example difference, 0 by
default), so the probe itself is the model when nothing does.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from transferops.finetune.cache import Autocast, encode_prefix
from transferops.finetune.logreg import linear_head, serial_blas
from transferops.model.blocks import StagedNet
from transferops.model.inputs import Inputs, Preprocess

log = logging.getLogger(__name__)


# Inverse regularisation strengths tried (sklearn's C). Val log-loss picks one: a proper score,
# far less coarse than accuracy on a small val set, and it avoids the weakly regularised fits
# that separate the few training examples perfectly (train loss ~0), from which fine-tuning
# gets no gradient (on the demo: val accuracy picked C=10, train loss 0.03, and no epoch of
# fine-tuning ever beat it; val loss picks C=1, train loss 0.16, and a better test score).
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class ProbeFit:
    """A fitted linear head: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # [classes, features]
    bias: torch.Tensor  # [classes]
    C: float
    val_accuracy: float
    val_loss: float
    val_correct: torch.Tensor | None = None  # per val example: the probe floor is paired


def paired_se(d: np.ndarray) -> float:
    """One standard error of the mean of paired per-example differences `d` (0 for fewer than
    two): how far apart two models scored on the same examples may be by noise alone (the
    source ranking's log-losses, the probe floor's correctness)."""
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def log_losses(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example log-loss of `logits` on labels `y` (a stable log-softmax)."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y]


def fit_probe(
    xtr: np.ndarray,
    ytr: np.ndarray,
    xva: np.ndarray,
    yva: np.ndarray,
    num_classes: int,
    class_weight: torch.Tensor | None = None,
    sample_weight: np.ndarray | None = None,
) -> ProbeFit:
    """Multinomial logistic regression (L-BFGS) for each C in :data:`C_GRID`; the one with
    the lowest val log-loss (then the highest val accuracy). `class_weight` (per class,
    :func:`transferops.finetune.balance.class_weights`) and `sample_weight` (per example:
    instance weights, :mod:`transferops.adapt`) weigh the training loss."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    best: tuple[tuple[float, float], ProbeFit] | None = None
    # One regularisation path, strong to weak, each fit starting from the previous optimum:
    # half the iterations of fitting each C from zero, same optima.
    weights = (
        None if class_weight is None else {int(c): float(class_weight[c]) for c in np.unique(ytr)}
    )
    clf = LogisticRegression(max_iter=1000, warm_start=True, class_weight=weights)
    for c in C_GRID:
        clf.set_params(C=c)
        with warnings.catch_warnings(), serial_blas():
            # a strongly regularised fit may stop early: fine here
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xtr, ytr, sample_weight=sample_weight)
        weight, bias = linear_head(clf, num_classes)
        logits = xva @ weight.T + bias
        acc = float((logits.argmax(1) == yva).mean())
        fit = ProbeFit(
            torch.tensor(weight, dtype=torch.float32),
            torch.tensor(bias, dtype=torch.float32),
            c,
            acc,
            float(log_losses(logits, yva).mean()),
            torch.from_numpy(logits.argmax(1) == yva),
        )
        if best is None or (-fit.val_loss, acc) > best[0]:
            best = ((-fit.val_loss, acc), fit)
    assert best is not None
    return best[1]


def probe_head(
    net: StagedNet,
    train: Inputs,
    val: Inputs,
    pre: Preprocess,
    batch_size: int,
    store: dict | None,
    amp: Autocast,
    class_weight: torch.Tensor | None = None,
) -> ProbeFit:
    """Fit the exact probe on the pooled features of the pretrained backbone and load it into
    ``net.head``. Features and fit are kept in `store`: they depend on the frozen backbone and
    the data only, so every trial of a search shares them (and stage 0 reuses the features)."""
    store = store if store is not None else {}
    nb = net.num_blocks
    key = ("probe", nb, None if class_weight is None else tuple(class_weight.tolist()))
    if key not in store:
        keys = {"train": ("train", nb, "none", None, 0), "val": ("val", nb)}
        for split, data in (("train", train), ("val", val)):
            if keys[split] not in store:  # the same entries the stage-0 feature cache uses
                store[keys[split]] = encode_prefix(net, data, nb, pre, batch_size, False, None, amp)
        feats = {s: store[k].double().cpu().numpy() for s, k in keys.items()}
        store[key] = fit_probe(
            feats["train"],
            train.y.cpu().numpy(),
            feats["val"],
            val.y.cpu().numpy(),
            net.head[-1].out_features,
            class_weight,
        )
        fit = store[key]
        log.info("exact probe: C=%g, val accuracy %.4f", fit.C, fit.val_accuracy)
    fit = store[key]
    linear = net.head[-1]
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight.device))
        linear.bias.copy_(fit.bias.to(linear.bias.device))
    return fit
