"""How two models are compared on val: by ``registry.metric``, the metric the promotion gates
decide on (accuracy | balanced_accuracy | macro_f1), so what the search keeps, what `train`
writes and what promotion accepts are judged alike. `evaluate` computes its test metrics
with the same functions.

Within one run the epochs are still chosen by val accuracy (and the exact probe floor is a
paired accuracy test): the per-epoch curves and the pruner's noise margin are accuracies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

from transferops.data.prepared import load_prepared
from transferops.model.blocks import Ensemble, StagedNet
from transferops.model.calibration import nll
from transferops.model.folder import SPEC_FILE, WEIGHTS_FILE
from transferops.model.inputs import folder_inputs, pick_device
from transferops.model.predict import predict_probs, predict_split
from transferops.runtime.artifacts import read_json, sha256_file

__all__ = ["ValProbs", "balanced_accuracy", "greedy_join", "macro_f1", "metric_value", "val_metric"]


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """The mean recall over the classes present in `y`."""
    labels = list(range(num_classes))
    _, recall, _, _ = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    present = np.isin(labels, y)
    return float(recall[present].mean()) if present.any() else 0.0


def macro_f1(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """F1 averaged over all classes (a class never predicted nor present scores 0)."""
    labels = list(range(num_classes))
    return float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))


def metric_value(metric: str, y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """`metric` (registry.metric) of predicted labels `pred` against `y`."""
    if metric == "accuracy":
        return float((pred == y).mean())
    if metric == "balanced_accuracy":
        return balanced_accuracy(y, pred, num_classes)
    return macro_f1(y, pred, num_classes)


def val_metric(
    metric: str,
    net: StagedNet | Ensemble,
    spec: dict,
    data_out: Path | str,
    inputs_dir: Path | str,
    device: str = "auto",
) -> float:
    """`net`'s `metric` on the val split in `data_out` (`inputs_dir`: the folder holding the
    tokenizer for text, a source's or a model's)."""
    val = load_prepared(data_out, "val")
    inputs = folder_inputs(val, Path(inputs_dir), spec)
    probs = predict_probs(net, spec, inputs, pick_device(device))  # eval mode, no grad
    return metric_value(metric, val.labels.numpy(), probs.argmax(1), len(val.class_names))


class ValProbs:
    """The val split's class probabilities at temperature 1 of saved model folders, each
    model's computed once: `train` reads every member's for the greedy join, then the
    ensemble's (the mean of its members') for its val score and for its temperature; on the
    text case each MiniLM val pass was seconds of CPU, six of nine of them repeats. Keyed by
    what the probabilities depend on (the weights' sha256 the spec recorded, the input
    width), so a folder rewritten in between (the classical candidate) is computed anew."""

    def __init__(self, data_out: Path | str, device: str = "auto") -> None:
        self.val = load_prepared(data_out, "val")
        self.labels = self.val.labels.numpy()
        self.device = device
        self._memo: dict[tuple, np.ndarray] = {}

    @staticmethod
    def _key(folder: Path) -> tuple:
        spec = read_json(Path(folder) / SPEC_FILE)
        sha = spec.get("weights_sha256") or sha256_file(Path(folder) / WEIGHTS_FILE)
        return sha, spec.get("max_length"), spec.get("image_size")

    def __call__(self, folder: Path) -> np.ndarray:
        key = self._key(folder)
        if key not in self._memo:  # its weights are verified against that sha256 on load
            device = pick_device(self.device)
            self._memo[key] = predict_split(folder, self.val, device, temperature=1.0)
        return self._memo[key]

    def remember(self, folder: Path, probs: np.ndarray) -> None:
        """Record `folder`'s probabilities computed another way (an ensemble's: the mean of
        its members', which is exactly what its network outputs)."""
        self._memo[self._key(folder)] = probs


def greedy_join(
    metric: str, members: list[Path], candidates: list[Path], val_probs: ValProbs
) -> list[tuple[Path, tuple[float, float], tuple[float, float]]]:
    """Greedy ensemble selection (Caruana et al. 2004), one pass: each of `candidates` (model
    folders, best first) joins the average of `members`' probabilities only if that average
    scores better on val with it than without (`metric`, then log-loss). Returns each
    candidate's (folder, score without, score with), joined or not: the caller keeps those
    whose score rose. On five benchmark cases val let the search's runner-up trial into the
    seeds' ensemble on three (test +1.5, +3.6, 0.0 points) and kept it out of the two where
    it would have cost 1.5 and 1.9 (bench/RESULTS.md)."""
    y, k = val_probs.labels, len(val_probs.val.class_names)

    def score(pool: list[np.ndarray]) -> tuple[float, float]:
        p = np.mean(pool, axis=0)
        return metric_value(metric, y, p.argmax(1), k), -nll(p, y)

    pool, out = [val_probs(f) for f in members], []
    for folder in candidates:
        p = val_probs(folder)
        before, after = score(pool), score([*pool, p])
        if after > before:
            pool.append(p)
        out.append((folder, before, after))
    return out
