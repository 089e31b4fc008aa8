"""The classical model as a candidate: train keeps it when fine-tuning does not beat it on val,
and the folder it writes predicts, and exports, exactly what sklearn fitted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from transferops.cli import app
from transferops.config import validate_config, with_overrides
from transferops.data.prepared import load_prepared, read_manifest
from transferops.finetune.classical import fit_classical, val_score
from transferops.finetune.train import Trained, keep_best_candidate
from transferops.model.folder import load_finetuned
from transferops.model.inputs import make_inputs
from transferops.model.predict import predict_probs
from transferops.registry.export import parity, to_onnx
from transferops.runtime.artifacts import read_json, write_json_atomic

from .conftest import write_image_folder


def _tuned_folder(out: Path, prepared: Path) -> dict:
    """A model.json as `train` writes for a fine-tuned network (the fields the classical
    candidate copies); no weights: only the classical model is ever loaded here."""
    train = load_prepared(prepared, "train")
    spec = {
        "format_version": 1,
        "class_names": train.class_names,
        "modality": "image",
        "image_size": 16,
        "image_resize": "crop",
        "data_hash": read_manifest(prepared)["data_hash"],
        "candidate": "finetuned",
    }
    out.mkdir(parents=True)
    write_json_atomic(out / "model.json", spec)
    return spec


def test_train_keeps_the_classical_model_unless_fine_tuning_beats_it_on_val(
    digits_prepared, tmp_path
):
    out = tmp_path / "finetuned"
    _tuned_folder(out, digits_prepared)
    cfg = validate_config({"data": {"out": str(digits_prepared)}, "finetune": {"out": str(out)}})
    train, val = load_prepared(digits_prepared, "train"), load_prepared(digits_prepared, "val")
    fit = fit_classical(train)
    acc, loss = val_score(fit, val)

    # fine-tuning beats it on val (accuracy, then loss): the fine-tuned folder stays
    better = Trained(acc, loss - 0.01, 3, 9, 1.0)
    kept = keep_best_candidate(cfg, better, "run")
    assert kept.candidate == "finetuned" and kept.classical_val_accuracy == acc
    assert read_json(out / "model.json")["candidate"] == "finetuned"
    off = with_overrides(cfg, {"registry.classical_candidate": False})
    assert keep_best_candidate(off, Trained(0.0, 9.0, 3, 9, 1.0), "run").candidate == "finetuned"

    # a tie in accuracy with a worse loss is not a win: the classical model is the candidate
    chosen = keep_best_candidate(cfg, Trained(acc, loss + 0.01, 3, 9, 1.0), "run")
    assert chosen.candidate == "classical" and chosen.val_accuracy == acc
    spec = read_json(out / "model.json")
    assert spec["candidate"] == "classical" and spec["source"]["family"] == "pixels"

    # the folder is an ordinary model: it predicts sklearn's probabilities and exports to ONNX
    net, spec = load_finetuned(out)
    inputs = make_inputs(train, out, spec["source"], 64)
    probs = predict_probs(net, spec, inputs, torch.device("cpu"))
    assert np.allclose(probs, fit.probs(train), atol=1e-5)
    to_onnx(out, tmp_path / "model.onnx", 17)
    check = parity(out, tmp_path / "model.onnx", inputs)
    assert check.max_abs < 1e-4 and check.label_agreement == 1.0


def test_the_pipeline_registers_and_exports_the_classical_model_when_it_wins(
    tmp_path, monkeypatch, caplog
):
    """On 16-px scans of three digits, pixels beat a briefly fine-tuned network on val: the
    run registers the pixel model, says so (summary, report, version tag, model card) and
    exports it like any other."""
    monkeypatch.chdir(tmp_path)
    write_image_folder(tmp_path / "raw", per_class=10)
    (tmp_path / "params.yaml").write_text(
        "data:\n  demo: null\n  path: raw\n  image: {size: 16}\n"
        "finetune:\n  unfreeze_depth: 1\n  epochs_per_stage: [1, 1]\n  batch_size: 8\n"
        "search:\n  n_trials: 1\n  space:\n    unfreeze_depth: {low: 0, high: 1}\n"
        "baseline:\n  seeds: [0]\n  scratch_trials: 0\n  linear_probe: false\n"
        "  efficiency_per_class: [null]\n"
        "registry:\n  baseline_gate: mean\n"
    )
    r = CliRunner().invoke(app, ["run", "--no-prefect", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.rindex("\n{\n") :])
    assert summary["candidate"] == "classical"
    assert any("does not beat it, so it is the candidate" in m for m in caplog.messages)
    net, spec = load_finetuned(tmp_path / "models" / "finetuned")
    assert net.num_blocks == 0 and spec["candidate"] == "classical"
    assert (
        "the classical model, not a fine-tuned network: fine-tuning did not beat it on val"
        in (tmp_path / "reports" / "evaluation.md").read_text()
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    mv = client.get_model_version("transferops-raw", "1")
    assert mv.tags["candidate"] == "classical" and "source_sha256" not in mv.tags
    assert "This is the classical model" in mv.description
    receipt = json.loads((tmp_path / "models" / "export" / "export.json").read_text())
    assert receipt["onnx_parity_max_abs"] < 1e-4


def test_the_classical_fit_is_made_once_per_training_data(digits_prepared):
    train, val = load_prepared(digits_prepared, "train"), load_prepared(digits_prepared, "val")
    first = fit_classical(train)
    assert fit_classical(load_prepared(digits_prepared, "train")) is first  # train, then evaluate
    other = fit_classical(val)  # other data: fitted anew
    assert other is not first and np.array_equal(other.clf.classes_, np.unique(val.labels))
    assert fit_classical(train) is not first  # only the last fit is kept
