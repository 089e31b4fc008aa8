"""The statistics the verdict and the gates rest on: intervals over seeds and over test examples.

Two sources of noise decide whether "transfer beats scratch" is believable: the training seed
and the test sample. A t-interval over 2-5 seeds is wide and swings with one unlucky seed; a
paired bootstrap over the test examples (each model's per-example correctness averaged over
its seeds, the same examples resampled for both) uses every test example and gives a stable
decision with two or three seeds. The verdict rests on the bootstrap; the seed interval is
reported beside it so a reader sees both.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 4000
# what every scored model reports (registry.metric is one of the first three)
SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "ece")


def mean_ci(
    values: list[float],
    confidence: float = 0.95,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> dict[str, Any]:
    """Mean and two-sided t confidence interval, clipped to the metric's `bounds` (None bounds
    with a single value)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    lo, hi = bounds
    return {"mean": mean, "ci_low": max(lo, mean - half), "ci_high": min(hi, mean + half), "n": n}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Mean of ``a - b`` with a percentile bootstrap interval over paired examples.

    `a` and `b` are per-example scores of two models on the same test examples (correctness,
    or correctness averaged over seeds). Seeded: the same inputs give the same interval.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one example")
    rng = np.random.default_rng(seed)
    # Resampled means without materialising [samples, n] indices: counts per example.
    weights = rng.multinomial(n, np.full(n, 1 / n), size=BOOTSTRAP_SAMPLES)
    means = weights @ d / n
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": n}


def bootstrap_ci(x: np.ndarray, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mean of one model's per-example scores with a percentile bootstrap interval over the
    examples: how much the test set's sampling moves it (not the training seed's noise)."""
    return paired_bootstrap(x, np.zeros(len(x)), confidence, seed)


def verdict(diff: dict[str, Any], a: str = "transfer", b: str = "scratch") -> str:
    """One line: does `a` beat `b` (accuracy difference in points, with its interval)?"""
    m = diff["mean"] * 100
    if diff["ci_low"] is None:
        return f"{a} - {b}: {m:+.1f} points (no interval)"
    half = (diff["ci_high"] - diff["ci_low"]) / 2 * 100
    if diff["ci_low"] > 0:
        return f"{a} beats {b} by {m:.1f} ± {half:.1f} points"
    if diff["ci_high"] < 0:
        return f"{b} beats {a} by {-m:.1f} ± {half:.1f} points"
    return f"no significant gain of {a} over {b} ({m:+.1f} ± {half:.1f} points)"


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def atc_accuracy(val_probs: np.ndarray, val_y: np.ndarray, target_probs: np.ndarray) -> float:
    """A model's accuracy on unlabelled examples, estimated: ATC with negative entropy (Garg
    et al. 2022, "Leveraging unlabeled data to predict out-of-distribution performance").

    On labelled val, the threshold t on the score sum(p log p) above which as many examples lie
    as the model gets right; the estimate is the share of `target_probs` scoring above t. It
    assumes the model is calibrated on val (the temperature) and that the shift moves
    confidence and correctness together: an estimate, never a measurement."""

    def score(p: np.ndarray) -> np.ndarray:
        return (p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)

    if not len(target_probs) or not len(val_probs):
        return float("nan")
    accuracy = float((val_probs.argmax(1) == val_y).mean())
    t = np.quantile(score(val_probs), 1.0 - accuracy)
    return float((score(target_probs) > t).mean())
