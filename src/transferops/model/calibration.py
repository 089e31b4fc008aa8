"""Calibrated probabilities: temperature scaling (Guo et al. 2017).

One number per model, fitted on the val split after training (``finetune.train``), stored
in ``model.json`` as ``temperature``; every consumer divides the logits by it before the
softmax (:func:`transferops.model.predict.predict_probs`, the served pyfunc, the ONNX graph).
The argmax, so accuracy, is unchanged; the probabilities mean what they say.
"""

from __future__ import annotations

import numpy as np
import torch

# A temperature outside this says more about a small val split than about the model: with
# few errors on val, NLL keeps falling as T -> 0 (probabilities of exactly 1 on test)
MIN_T, MAX_T = 0.25, 20.0


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean())


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """`probs` as the same logits divided by `temperature` would give them (softmax is
    blind to a shift, so log-probabilities serve as the logits)."""
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0))).double()
    return torch.softmax(logits / temperature, 1).numpy()


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the NLL of `probs` (val) on labels `y` (L-BFGS on
    log T, from T = 1), within [MIN_T, MAX_T]; 1.0 when there is nothing to fit: no
    examples, or none wrong (the NLL would then only say "sharper", without limit)."""
    if len(y) == 0 or probs.shape[1] < 2 or (probs.argmax(1) == y).all():
        return 1.0
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0))).double()
    target = torch.from_numpy(y).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, MIN_T), MAX_T)
