"""The classical model: multinomial logistic regression on raw pixels (images) or on TF-IDF
(text), fitted on train in a second or two.

`evaluate` scores it as the reference a fine-tuned network must beat. For images it is also a
candidate: when fine-tuning does not beat it on val, `train` writes it as the model (the
rule that already makes the exact probe the model when no epoch beats it). It is then an
ordinary model folder, a linear head on the pixels (family ``pixels``, no backbone), so
prediction, serving, the MLflow pyfunc and the ONNX export take it unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from transferops.data.prepared import PreparedData
from transferops.finetune.logreg import linear_head, serial_blas
from transferops.model.blocks import StagedNet
from transferops.model.families import UNIT, build_architecture, build_staged

NAMES = {"image": "logistic regression on raw pixels", "text": "TF-IDF + logistic regression"}
SOURCE_NAME = "logistic-regression-pixels"


@dataclass
class Classical:
    """A fitted classical model and the text vectoriser it reads through (None for pixels)."""

    clf: LogisticRegression
    vectorizer: TfidfVectorizer | None
    num_classes: int

    @property
    def name(self) -> str:
        return NAMES["text" if self.vectorizer is not None else "image"]

    def features(self, data: PreparedData) -> Any:
        if self.vectorizer is not None:
            return self.vectorizer.transform(data.texts or [])
        assert data.images is not None
        return data.images.flatten(1).float().numpy() / 255

    def probs(self, data: PreparedData) -> np.ndarray:
        """Class probabilities [N, classes] (0 for a class absent from train)."""
        out = np.zeros((len(data), self.num_classes))
        out[:, self.clf.classes_] = self.clf.predict_proba(self.features(data))
        return out


_LAST_FIT: dict[str, Classical] = {}


def fit_classical(train: PreparedData) -> Classical:
    """Logistic regression (sklearn's defaults: C=1, L-BFGS) on train's pixels or TF-IDF.
    The fit is deterministic: the last one is kept by train's content, so `train` and
    `evaluate` in one process (the pipeline) fit it once."""
    key = _content_digest(train)
    if key not in _LAST_FIT:
        _LAST_FIT.clear()
        _LAST_FIT[key] = _fit(train)
    return _LAST_FIT[key]


def _content_digest(data: PreparedData) -> str:
    h = hashlib.sha256(data.labels.numpy().tobytes())
    if data.images is not None:
        h.update(data.images.numpy().tobytes())
    h.update("\0".join(data.texts or []).encode())
    return h.hexdigest()


def _fit(train: PreparedData) -> Classical:
    vec = None
    if train.modality == "text":
        vec = TfidfVectorizer(sublinear_tf=True, min_df=1).fit(train.texts or [])
    fit = Classical(LogisticRegression(max_iter=2000), vec, len(train.class_names))
    with serial_blas():
        fit.clf.fit(fit.features(train), train.labels.numpy())
    return fit


def val_score(fit: Classical, val: PreparedData) -> tuple[float, float]:
    """(accuracy, mean log-loss) on val: what fine-tuning's best epoch is compared with."""
    p = fit.probs(val)
    y = val.labels.numpy()
    loss = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean()
    return float((p.argmax(1) == y).mean()), float(loss)


def pixel_net(fit: Classical, image_size: int) -> StagedNet:
    """The pixel model as a StagedNet: no blocks, its head = the regression's coefficients
    (inputs normalised to pixels / 255, exactly what it was fitted on)."""
    model, family = build_architecture("classical", SOURCE_NAME)
    net = build_staged(model, family, fit.num_classes, image_size=image_size)
    weight, bias = linear_head(fit.clf, fit.num_classes)
    with torch.no_grad():
        net.head[-1].weight.copy_(torch.from_numpy(weight))
        net.head[-1].bias.copy_(torch.from_numpy(bias))
    return net.eval()


def pixel_source() -> dict[str, Any]:
    """The `source` entry of the pixel model's spec: what rebuilds it (kind classical); no
    pretrained weights, so no checksum."""
    return {
        "kind": "classical",
        "name": SOURCE_NAME,
        "family": "pixels",
        "origin": f"classical: {NAMES['image']} (sklearn, fitted on train)",
        "input": {"type": "image", **UNIT},
        "num_blocks": 0,
        "sha256": None,
    }
