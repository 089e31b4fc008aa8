"""The model to register gets calibrated probabilities: a temperature fitted on val.

Runs last in `transferops train`, on whatever ``finetune.out`` holds (the fine-tuned network
or the classical candidate): the folder's weights are untouched, its ``model.json`` gains
``temperature`` and the val NLL before and after (see :mod:`transferops.model.calibration`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transferops.config import Config
from transferops.data.prepared import load_prepared
from transferops.model.calibration import fit_temperature, nll, scaled
from transferops.model.folder import SPEC_FILE, load_finetuned
from transferops.model.inputs import make_inputs, pick_device
from transferops.model.predict import predict_probs
from transferops.runtime.artifacts import read_json, write_json_atomic

log = logging.getLogger(__name__)


def calibrate(cfg: Config) -> dict[str, Any]:
    """Fit finetune.out's temperature on the val split and record it in its spec; the
    record (temperature, val NLL before / after)."""
    folder = Path(cfg.finetune.out)
    net, spec = load_finetuned(folder)
    val = load_prepared(cfg.data.out, "val")
    inputs = make_inputs(val, folder, spec["source"], spec.get("max_length", 64))
    raw = spec | {"temperature": 1.0}  # the uncalibrated probabilities, whatever it held
    probs = predict_probs(net, raw, inputs, pick_device(cfg.finetune.device))
    y = val.labels.numpy()
    t = fit_temperature(probs, y)
    record = {
        "temperature": round(t, 4),
        "val_nll_before": round(nll(probs, y), 4),
        "val_nll_after": round(nll(scaled(probs, t), y), 4),
    }
    write_json_atomic(
        folder / SPEC_FILE,
        read_json(folder / SPEC_FILE) | {"temperature": t, "calibration": record},
    )
    log.info(
        "calibrated: temperature %.3f fitted on val, val NLL %.4f -> %.4f (accuracy unchanged)",
        t,
        record["val_nll_before"],
        record["val_nll_after"],
    )
    return record
