"""Calibrated probabilities: a temperature fitted on val lowers its NLL, keeps every argmax,
and is what the exported ONNX model and the model folder's predictions apply."""

from __future__ import annotations

import numpy as np
import torch

from transferops.model.calibration import fit_temperature, nll, scaled


def _overconfident(n: int = 400, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of a model right 70% of the time but ~99% sure of every answer."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), pred] += 8.0
    return torch.softmax(torch.from_numpy(logits), 1).numpy(), y


def test_temperature_scaling_lowers_nll_and_keeps_the_argmax():
    probs, y = _overconfident()
    t = fit_temperature(probs, y)
    assert t > 1.5  # overconfident: the logits are softened
    calibrated = scaled(probs, t)
    assert nll(calibrated, y) < nll(probs, y) - 0.5
    assert (calibrated.argmax(1) == probs.argmax(1)).all()  # accuracy unchanged
    held_out, y2 = _overconfident(seed=1)  # the same model on other data: better there too
    assert nll(scaled(held_out, t), y2) < nll(held_out, y2)
    # a scaled model's own temperature is found back
    assert abs(fit_temperature(scaled(calibrated, 1 / t), y) - t) < 0.05 * t
    # a val split the model gets all right says nothing about calibration: left alone
    right = np.eye(5)[y] * 0.6 + 0.1
    assert fit_temperature(right, y) == 1.0


def test_the_exported_graph_and_predict_apply_the_temperature(tmp_path):
    from transferops.model.families import build_staged
    from transferops.model.inputs import Inputs
    from transferops.model.predict import predict_probs
    from transferops.registry.export import Probabilities

    torch.manual_seed(0)
    net = build_staged(torch.nn.Identity(), "pixels", 3, image_size=8).eval()  # a linear head
    spec = {
        "source": {"input": {"mean": [0.5] * 3, "std": [0.5] * 3}, "family": "pixels"},
        "modality": "image",
        "class_names": ["a", "b", "c"],
    }
    x = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    plain = predict_probs(
        net, spec, Inputs(x, torch.zeros(6, dtype=torch.long)), torch.device("cpu")
    )
    hot = predict_probs(
        net, spec | {"temperature": 2.5}, Inputs(x, torch.zeros(6).long()), torch.device("cpu")
    )
    np.testing.assert_allclose(hot, scaled(plain, 2.5), atol=1e-5)
    from transferops.model.inputs import make_preprocess

    pre = make_preprocess(spec["source"], torch.device("cpu"), "image")
    with torch.no_grad():
        graph = Probabilities(net, pre, 2.5)(x).numpy()
    np.testing.assert_allclose(graph, hot, atol=1e-5)
