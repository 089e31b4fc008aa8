"""The adaptation methods, each small and on its own (``adapt.methods`` lists which run).

The head of every adapted model is the exact linear probe refitted on the (possibly
BN-adapted) backbone's pooled features; the methods differ in what that refit sees:

- ``adabn`` (after Li et al. 2016): every BatchNorm layer's statistics moved so that the
  unlabelled target images reach it distributed as the source's did; no weight changes, no
  labels. Covariate shift in the statistics is what BN-normalised networks suffer most from
  (Schneider et al. 2020 on corruptions).
- ``align`` (deep CORAL, Sun & Saenko 2016): feature-based transfer during fine-tuning: the
  top blocks and the head trained on the labelled source while the covariances of source and
  target features are pulled together; the head is then refitted like the others.
- ``coral`` (Sun et al. 2016): the labelled source features whitened with their own
  covariance and recoloured with the target's, so the head is fitted where the target lies.
- ``weights``: instance-based transfer: a domain classifier (logistic regression, source vs
  target features) gives each labelled example w = p(target|x) / p(source|x), clipped and
  normalised to mean 1; the head's loss weighs examples by it.
- ``pseudo_label``: self-training: the current model labels the unlabelled target images,
  those at or above a confidence threshold join the training set, the head is refitted;
  a few rounds. The teacher never sees ``data.target_test`` (it only scores).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from transferops.finetune.cache import Autocast, encode_prefix
from transferops.finetune.thaw import batchnorms
from transferops.model.blocks import StagedNet
from transferops.model.inputs import Inputs, Preprocess

WEIGHT_CLIP = 10.0  # an example weighs at most 10x / at least 1/10x the mean
CORAL_EPS = 1.0  # added to the covariances' diagonals (Sun et al.: "1 works well")


ADABN_SAMPLE = 256  # images per domain in the one forward pass that measures statistics


@torch.no_grad()
def _bn_input_stats(
    net: StagedNet, data: Inputs, pre: Preprocess, amp: Autocast, hook: Callable
) -> None:
    """One eval-mode forward pass of a sample of `data`, `hook(bn, input)` called before
    every BatchNorm layer (in network order, so a hook that moves a layer's statistics is
    seen by the layers after it)."""
    bns = [m for b in net.blocks for m in batchnorms(b)]
    handles = [m.register_forward_pre_hook(lambda m, inp: hook(m, inp[0].float())) for m in bns]
    try:
        net.eval()
        idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
        x, ctx = data.batch(idx[:ADABN_SAMPLE])
        with amp():
            net.encode(pre(x, False, None), net.num_blocks, ctx)
    finally:
        for h in handles:
            h.remove()


def adabn(net: StagedNet, source: Inputs, target: Inputs, pre: Preprocess, amp: Autocast) -> int:
    """Move every BatchNorm layer's statistics so that target images reach each layer
    distributed as the source's images did (mean and variance per channel); returns how many
    layers moved. Weights are untouched.

    AdaBN proper (Li et al. 2016) replaces the statistics with the target's; that assumes
    they were the source's. Here they are usually the pretrained ImageNet statistics, frozen
    during fine-tuning (``finetune.bn_mode: frozen``), and the fine-tuned layers learned from
    source activations normalised by them. So for each layer, in network order, with (m_s,
    v_s) the source's input statistics, (m_t, v_t) the target's and (m, v) the layer's: the
    new statistics v' = (v + eps) v_t / v_s - eps and m' = m_t - (m_s - m) sqrt(v_t / v_s)
    make a target input normalise exactly as the matching source input did. Where the
    statistics are the source's (m = m_s, v = v_s), this is AdaBN proper."""
    source_stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(bn: nn.Module, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        source_stats[bn] = (x.mean(dims), x.var(dims, unbiased=False))

    def move(bn: nn.Module, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        mt, vt = x.mean(dims), x.var(dims, unbiased=False)
        ms, vs = source_stats[bn]
        ratio = ((vt + bn.eps) / (vs + bn.eps)).sqrt()
        mean, var = bn.running_mean.float(), bn.running_var.float()
        bn.running_mean.copy_(mt - (ms - mean) * ratio)
        bn.running_var.copy_((var + bn.eps) * ratio**2 - bn.eps)

    _bn_input_stats(net, source, pre, amp, record)
    _bn_input_stats(net, target, pre, amp, move)
    return len(source_stats)


@torch.no_grad()
def pooled_features(
    net: StagedNet, data: Inputs, pre: Preprocess, bs: int, amp: Autocast
) -> np.ndarray:
    """The backbone's pooled features (the head's input) for every example, float64."""
    net.eval()
    return encode_prefix(net, data, net.num_blocks, pre, bs, amp=amp).double().cpu().numpy()


def _sqrtm(c: np.ndarray, inverse: bool = False) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    vals = np.clip(vals, 1e-12, None) ** (-0.5 if inverse else 0.5)
    return (vecs * vals) @ vecs.T


def coral_map(source: np.ndarray, target: np.ndarray):
    """A function taking source features to the target's mean and covariance (CORAL)."""
    eye = CORAL_EPS * np.eye(source.shape[1])
    cs = np.cov(source, rowvar=False) + eye
    ct = np.cov(target, rowvar=False) + eye
    a = _sqrtm(cs, inverse=True) @ _sqrtm(ct)
    ms, mt = source.mean(0), target.mean(0)
    return lambda x: (x - ms) @ a + mt


def domain_weights(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Instance weights of the source examples, p(target|x) / p(source|x) from a logistic
    domain classifier (rescaled for the two sets' sizes, clipped to [1/WEIGHT_CLIP,
    WEIGHT_CLIP], mean 1); and that classifier's cross-validated AUC (0.5: the domains look
    alike in these features; 1: fully apart)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from transferops.finetune.logreg import serial_blas

    x = np.vstack([source, target])
    d = np.r_[np.zeros(len(source)), np.ones(len(target))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=0.1, max_iter=1000)
    with serial_blas():
        p = cross_val_predict(clf, (x - mu) / sd, d, cv=5, method="predict_proba")[:, 1]
    auc = _auc(p, d)
    ps = np.clip(p[: len(source)], 1e-6, 1 - 1e-6)
    w = ps / (1 - ps) * len(source) / len(target)
    w = np.clip(w / w.mean(), 1 / WEIGHT_CLIP, WEIGHT_CLIP)
    return w / w.mean(), auc


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(label, score))


def confident(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) of the examples whose top probability is at least `threshold`."""
    keep = np.flatnonzero(probs.max(1) >= threshold)
    return keep, probs[keep].argmax(1)


def coral_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Deep CORAL's distance (Sun & Saenko 2016): the squared Frobenius distance between the
    two batches' feature covariances, over 4 d^2."""
    d = a.shape[1]
    return ((torch.cov(a.T) - torch.cov(b.T)) ** 2).sum() / (4 * d * d)


def _tie_parameters(copy_: nn.Module, original: nn.Module) -> None:
    """Make `copy_` use `original`'s parameter tensors (same structure): one set of weights
    trained through two views, each keeping its own buffers (BatchNorm statistics)."""
    for mc, mo in zip(copy_.modules(), original.modules(), strict=True):
        for name, p in mo._parameters.items():
            mc._parameters[name] = p


def align(
    net: StagedNet,
    source_view: StagedNet,
    source: Inputs,
    target: Inputs,
    pre: Preprocess,
    amp: Autocast,
    settings: dict,
) -> dict:
    """Feature alignment during fine-tuning (deep CORAL, Sun & Saenko 2016): the top
    ``settings["depth"]`` blocks and the head are trained on the labelled source images
    (cross-entropy) while the covariances of their pooled source and target features are
    pulled together. `net` sees target images (its BatchNorm statistics, moved by AdaBN when
    that ran), `source_view` the source images (the original statistics); both share the
    trained weights. The CORAL term is scaled to the cross-entropy's size at the first step
    (times ``settings["weight"]``): 1/(4 d^2) alone is orders of magnitude below it for
    d = 1280. Returns the CORAL distance over all images before and after."""
    depth, bs = settings["depth"], settings["batch_size"]
    start = net.num_blocks - depth
    for top_s, top_t in zip(source_view.blocks[start:], net.blocks[start:], strict=True):
        _tie_parameters(top_s, top_t)
    source_view.head = net.head
    params = [p for b in net.blocks[start:] for p in b.parameters()] + list(net.head.parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    net.eval()  # BatchNorm statistics stay each view's own, and fixed
    source_view.eval()
    hs = encode_prefix(source_view, source, start, pre, bs * 2, amp=amp)
    ht = encode_prefix(net, target, start, pre, bs * 2, amp=amp)
    ys = source.y.to(hs.device)

    def pooled(view: StagedNet, h: torch.Tensor) -> torch.Tensor:
        return view.pool(view.run_blocks(h, start, view.num_blocks), None).float()

    def distance() -> float:
        with torch.no_grad(), amp():
            a = torch.cat([pooled(source_view, hs[i : i + bs]) for i in range(0, len(hs), bs)])
            b = torch.cat([pooled(net, ht[i : i + bs]) for i in range(0, len(ht), bs)])
        return float(coral_loss(a, b))

    before = distance()
    opt = torch.optim.Adam(params, lr=settings["lr"])
    gen = torch.Generator().manual_seed(settings["seed"])
    scale = None
    for _ in range(settings["epochs"]):
        order = torch.randperm(len(hs), generator=gen)
        for i in range(0, len(hs), bs):
            idx = order[i : i + bs]
            tidx = torch.randint(len(ht), (max(len(idx), 2),), generator=gen)
            with amp():
                fs, ft = pooled(source_view, hs[idx]), pooled(net, ht[tidx])
                ce = torch.nn.functional.cross_entropy(net.head(fs).float(), ys[idx])
                gap = coral_loss(fs, ft) if len(idx) > 1 else torch.zeros(())
            if scale is None:  # the two terms start the same size
                scale = settings["weight"] * float(ce.detach()) / max(float(gap.detach()), 1e-12)
            loss = ce + scale * gap
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return {"depth": depth, "coral_before": before, "coral_after": distance()}
