"""ONNX export: the graph computes what the PyTorch model computes (real ONNX Runtime), on
image and text models, at any batch size; a graph that does not is refused, and nothing is
published."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from transferops.config import validate_config
from transferops.data.prepare import prepare
from transferops.data.prepared import load_prepared
from transferops.finetune.train import train_from_config
from transferops.model.inputs import make_inputs
from transferops.registry import export as export_module
from transferops.registry.export import ExportError, export, onnx_probs, parity, to_onnx
from transferops.runtime.artifacts import sha256_file
from transferops.sources.pull import pull_from_config

from .conftest import fortunes_minilm, tiny_digits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lite0_source) -> tuple[dict, Path]:
    """A fine-tuned Lite0 on the tiny digits (two stages: head, then one block): the
    ensemble of two seeds `train` writes by default (random heads: two different networks;
    from the probe, both would end as the same exact probe on 6 val images)."""
    root = tmp_path_factory.mktemp("export")
    raw = {
        "data": tiny_digits(root),
        "source": {"out": str(lite0_source)},
        "finetune": {
            "unfreeze_depth": 1,
            "epochs_per_stage": [1, 1],
            "head_init": "random",
            "batch_size": 8,
            "out": str(root / "ft"),
            "metrics": str(root / "train.json"),
            "checkpoint_dir": str(root / "ck"),
        },
        "search": {"out": str(root / "search")},
        "export": {"out": str(root / "export")},
        "registry": {"out": str(root / "registry.json"), "classical_candidate": False},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "e"},
    }
    cfg = validate_config(raw)
    prepare(cfg)
    train_from_config(cfg)
    return raw, root


def test_image_model_onnx_matches_pytorch_at_any_batch(trained, tmp_path):
    _, root = trained
    to_onnx(root / "ft", tmp_path / "m.onnx", 17)
    spec = json.loads((root / "ft" / "model.json").read_text())
    assert spec["candidate"] == "ensemble" and len(spec["members"]) == 2  # both in the graph
    inputs = make_inputs(load_prepared(root / "prep", "test"), root / "ft", spec["source"], 64)
    p = parity(root / "ft", tmp_path / "m.onnx", inputs)
    assert p.examples == 6 and p.max_abs < 1e-4 and p.label_agreement == 1.0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    one = session.run(None, {"images": inputs.x[:1].numpy()})[0]
    assert one.shape == (1, 3) and np.allclose(one, onnx_probs(session, inputs)[:1], atol=1e-6)


@pytest.mark.slow  # 14 s (MiniLM); the image model's parity runs in the fast suite
def test_text_model_onnx_matches_pytorch(tmp_path):
    """MiniLM (the packaged HF encoder) fine-tuned on the fortunes: token ids + mask in,
    dynamic batch and length, the same probabilities as PyTorch on the test split."""
    cfg = validate_config(
        {
            **fortunes_minilm(tmp_path),
            "finetune": {
                "unfreeze_depth": 1,
                "epochs_per_stage": [1],
                "max_length": 32,
                "batch_size": 16,
                "out": str(tmp_path / "ft"),
                "metrics": str(tmp_path / "train.json"),
                "checkpoint_dir": str(tmp_path / "ck"),
            },
            "search": {"out": str(tmp_path / "search")},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"},
        }
    )
    pull_from_config(cfg)
    prepare(cfg)
    train_from_config(cfg)
    folder = tmp_path / "ft"
    to_onnx(folder, tmp_path / "t.onnx", 17)
    spec = json.loads((folder / "model.json").read_text())
    inputs = make_inputs(load_prepared(tmp_path / "prep", "test"), folder, spec["source"], 32)
    p = parity(folder, tmp_path / "t.onnx", inputs)
    assert p.examples == len(inputs) > 20 and p.max_abs < 1e-4 and p.label_agreement == 1.0
    session = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]


def test_an_export_that_differs_from_pytorch_is_refused(trained, monkeypatch):
    """A deliberately broken graph (its probabilities sharpened) is refused with the
    measured gap, and neither export.out nor the model version receives anything."""
    raw, root = trained
    weights = root / "ft" / "model.safetensors"
    receipt = {
        "model_name": "m",
        "version": "1",
        "model_sha256": sha256_file(weights),
        "mlflow_run_id": "never-used",
    }
    (root / "registry.json").write_text(json.dumps(receipt))
    honest = export_module.Probabilities.forward

    def sharpened(self, x, mask=None):
        return torch.softmax(torch.log(honest(self, x, mask)) * 1.5, 1)

    monkeypatch.setattr(export_module.Probabilities, "forward", sharpened)
    published = []
    monkeypatch.setattr(export_module, "_publish", lambda *a: published.append(a))
    with pytest.raises(ExportError, match=r"refused: ONNX Runtime and PyTorch differ by up to"):
        export(validate_config(raw))
    assert not (root / "export").exists() and not published
    monkeypatch.setattr(export_module.Probabilities, "forward", honest)
    done = export(validate_config(raw))  # the honest graph passes and is published
    assert done["onnx_sha256"] == sha256_file(root / "export" / "model.onnx") and published


def test_a_model_that_upsamples_its_input_trains_serves_and_exports_at_that_side(tmp_path):
    """A source pulled with a ranked input size (16-px images shown at 32): the network is
    built for 32 and sees 32x32 in training and in `predict` (the resize is the model's own),
    and the ONNX graph takes the 16-px images and returns what PyTorch returns."""
    from transferops.config import SourceConfig
    from transferops.model.folder import load_finetuned
    from transferops.model.predict import predict_probs
    from transferops.sources.pull import pull

    src = pull(SourceConfig(out=tmp_path / "src"), ranking={"input_size": 32})
    assert src.manifest["input"]["size"] == 32
    raw = {
        "data": tiny_digits(tmp_path),
        "source": {"out": str(tmp_path / "src")},
        "finetune": {
            "unfreeze_depth": 1,
            "epochs_per_stage": [1, 1],
            "ensemble": 1,
            "batch_size": 8,
            "out": str(tmp_path / "ft"),
            "metrics": str(tmp_path / "train.json"),
            "checkpoint_dir": str(tmp_path / "ck"),
        },
        "registry": {"classical_candidate": False},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"},
    }
    cfg = validate_config(raw)
    prepare(cfg)
    train_from_config(cfg)
    net, spec = load_finetuned(tmp_path / "ft")
    assert spec["image_size"] == 16 and spec["source"]["input"]["size"] == 32
    seen = []
    net.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    prepared = load_prepared(tmp_path / "prep", "test")
    test = make_inputs(prepared, tmp_path / "ft", spec["source"], 64)
    assert tuple(test.x.shape[-2:]) == (16, 16)
    probs = predict_probs(net, spec, test, torch.device("cpu"))
    assert seen and set(seen) == {(32, 32)} and np.allclose(probs.sum(1), 1, atol=1e-5)
    to_onnx(tmp_path / "ft", tmp_path / "m.onnx", 17)
    p = parity(tmp_path / "ft", tmp_path / "m.onnx", test)
    assert p.max_abs < 1e-4 and p.label_agreement == 1.0
