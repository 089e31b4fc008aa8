"""`transferops export`: the registered model as ONNX, checked against PyTorch before it is
published.

The graph takes what the model takes after decoding (uint8 images ``[N, 3, H, W]``, or
token ids and attention mask ``[N, L]``; batch and length dynamic) and returns class
probabilities: normalisation and softmax are inside, so a server needs only ONNX Runtime
and the decoder / tokenizer. Before anything is written, ONNX Runtime and PyTorch score the
test split (two runtimes of one fixed model: nothing is chosen on it) and the export is
refused when a probability differs by more than ``export.tolerance`` or a label differs.
Published: ``export.out/model.onnx`` + ``export.json``, the file as an artifact of the
registered version's run (``onnx/model.onnx``) and the version's tags ``onnx_sha256``,
``onnx_opset``, ``onnx_parity_max_abs``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from transferops.config import Config
from transferops.data.prepared import load_prepared
from transferops.errors import RegistryError
from transferops.model.folder import SPEC_FILE, WEIGHTS_FILE, load_finetuned
from transferops.model.inputs import Inputs, Preprocess, folder_inputs, make_preprocess
from transferops.model.predict import predict_probs
from transferops.runtime.artifacts import atomic_dir, read_json, sha256_file, write_json_atomic
from transferops.runtime.tracking import setup_tracking

log = logging.getLogger(__name__)
BATCH = 64


class ExportError(RegistryError):
    """The ONNX graph does not compute what the PyTorch model computes."""


class Probabilities(nn.Module):
    """What the ONNX graph computes: model inputs -> class probabilities, with the same
    normalisation as :func:`transferops.model.predict.predict_probs`."""

    def __init__(self, net: nn.Module, pre: Preprocess, temperature: float = 1.0) -> None:
        super().__init__()
        self.net, self.pre, self.temperature = net, pre, temperature

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.net(self.pre(x, False, None), mask).float()
        return torch.softmax(logits / self.temperature, 1)


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs PyTorch on one split."""

    examples: int
    max_abs: float  # largest |p_onnx - p_torch| over examples and classes
    label_agreement: float  # share of examples with the same argmax


def to_onnx(model_dir: Path, dst: Path, opset: int) -> list[str]:
    """Write the model folder's model as ONNX to `dst`; the graph's input names."""
    net, spec = load_finetuned(model_dir)
    text = spec["modality"] == "text"
    # the normalisation predict_probs applies (none for text)
    wrapped = Probabilities(
        net,
        make_preprocess(spec["source"], torch.device("cpu"), spec["modality"]),
        float(spec.get("temperature", 1.0)),  # the calibrated probabilities, as predict gives
    )
    if text:
        args: tuple = (torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
        names = ["input_ids", "attention_mask"]
        axes = {n: {0: "batch", 1: "length"} for n in names}
    else:
        size = spec.get("image_size") or 32
        args = (torch.zeros(2, 3, size, size, dtype=torch.uint8),)
        names, axes = ["images"], {"images": {0: "batch"}}
    with warnings.catch_warnings():  # the exporter's notes on constant folding and deprecation
        warnings.simplefilter("ignore")
        _export_graph(wrapped.eval(), args, dst, opset, names, axes)
    return names


def _export_graph(
    model: nn.Module, args: tuple, dst: Path, opset: int, names: list[str], axes: dict
) -> None:
    torch.onnx.export(
        model,
        args,
        str(dst),
        dynamo=False,  # the TorchScript exporter: no onnxscript, stable opsets
        opset_version=opset,
        input_names=names,
        output_names=["probabilities"],
        dynamic_axes=axes | {"probabilities": {0: "batch"}},
    )


def onnx_probs(session: ort.InferenceSession, inputs: Inputs) -> np.ndarray:
    """Class probabilities from ONNX Runtime, batched the way predict_probs batches."""
    order = inputs.inference_order()
    names = [i.name for i in session.get_inputs()]
    out = []
    for i in range(0, len(inputs), BATCH):
        x, ctx = inputs.batch(order[i : i + BATCH])
        feed = {names[0]: x.numpy()} | ({names[1]: ctx.numpy()} if ctx is not None else {})
        out.append(session.run(["probabilities"], feed)[0])
    return np.concatenate(out)[torch.argsort(order).numpy()]


def parity(model_dir: Path, onnx_path: Path, inputs: Inputs) -> Parity:
    """Score `inputs` with PyTorch (eager, CPU) and ONNX Runtime; how far apart they are."""
    net, spec = load_finetuned(model_dir)
    ref = predict_probs(net, spec, inputs, torch.device("cpu"), batch_size=BATCH)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = onnx_probs(session, inputs)
    return Parity(
        examples=len(ref),
        max_abs=float(np.abs(got - ref).max()) if len(ref) else 0.0,
        label_agreement=float((got.argmax(1) == ref.argmax(1)).mean()) if len(ref) else 1.0,
    )


def _test_inputs(cfg: Config, model_dir: Path) -> Inputs:
    spec = read_json(model_dir / SPEC_FILE)
    test = load_prepared(cfg.data.out, "test")
    return folder_inputs(test, model_dir, spec)


def _registered(cfg: Config) -> tuple[dict[str, Any], Path]:
    """registry.json and the model folder holding exactly the registered weights."""
    receipt = Path(cfg.registry.out)
    if not receipt.exists():
        raise RegistryError(f"{receipt} not found: run `transferops register` before export")
    reg = read_json(receipt)
    model_dir = Path(cfg.finetune.out)
    weights = model_dir / WEIGHTS_FILE
    if not weights.exists() or sha256_file(weights) != reg["model_sha256"]:
        raise RegistryError(
            f"{model_dir} no longer holds {reg['model_name']} v{reg['version']} (its weights "
            "changed since register): run `transferops register`, then export"
        )
    return reg, model_dir


def _publish(cfg: Config, reg: dict[str, Any], onnx_path: Path, receipt: dict[str, Any]) -> None:
    """The ONNX file on the registered version's run, its facts as the version's tags."""
    mlflow = setup_tracking(cfg.tracking)
    client = mlflow.MlflowClient()
    client.log_artifact(reg["mlflow_run_id"], str(onnx_path), "onnx")
    for key in ("onnx_sha256", "onnx_opset", "onnx_parity_max_abs"):
        client.set_model_version_tag(reg["model_name"], reg["version"], key, str(receipt[key]))


def export(cfg: Config) -> dict[str, Any]:
    """Export the registered model to ONNX, check it against PyTorch on the test split,
    and publish it (refused, with nothing written, when they differ beyond tolerance)."""
    ec = cfg.export
    reg, model_dir = _registered(cfg)
    out = Path(ec.out)
    with atomic_dir(out) as tmp:
        to_onnx(model_dir, tmp / "model.onnx", ec.opset)
        p = parity(model_dir, tmp / "model.onnx", _test_inputs(cfg, model_dir))
        if p.max_abs > ec.tolerance:
            raise ExportError(
                f"ONNX export of {reg['model_name']} v{reg['version']} refused: ONNX Runtime "
                f"and PyTorch differ by up to {p.max_abs:.2e} in a probability on the "
                f"{p.examples} test examples (export.tolerance {ec.tolerance:.0e}; labels "
                f"agree on {p.label_agreement:.1%}). The model stays registered; set "
                "export.onnx: false to skip the export"
            )
        receipt = {
            "model_name": reg["model_name"],
            "version": reg["version"],
            "model_sha256": reg["model_sha256"],
            "onnx_sha256": sha256_file(tmp / "model.onnx"),
            "onnx_opset": ec.opset,
            "onnx_parity_max_abs": p.max_abs,
            "label_agreement": p.label_agreement,
            "parity_examples": p.examples,
            "onnxruntime": ort.__version__,
        }
        write_json_atomic(tmp / "export.json", receipt)
    _publish(cfg, reg, out / "model.onnx", receipt)
    log.info(
        "exported %s v%s to %s: parity max |dp| %.1e on %d test examples, labels agree %.1f%%",
        reg["model_name"],
        reg["version"],
        out / "model.onnx",
        p.max_abs,
        p.examples,
        p.label_agreement * 100,
    )
    return receipt
