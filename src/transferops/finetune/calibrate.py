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
from transferops.finetune.selection import ValProbs
from transferops.model.calibration import fit_temperature, nll, scaled
from transferops.model.folder import SPEC_FILE
from transferops.runtime.artifacts import read_json, write_json_atomic

log = logging.getLogger(__name__)


def calibrate(cfg: Config, val_probs: ValProbs | None = None) -> dict[str, Any]:
    """Fit finetune.out's temperature on the val split and record it in its spec; the
    record (temperature, val NLL before / after). `val_probs`: the val probabilities
    `train` already computed (its ensemble's), else computed here."""
    folder = Path(cfg.finetune.out)
    val_probs = val_probs or ValProbs(cfg.data.out, cfg.finetune.device)
    probs = val_probs(folder)  # at temperature 1, whatever the folder held
    y = val_probs.labels
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
