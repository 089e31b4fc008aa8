"""The drift check a scheduled run makes before retraining: a kernel two-sample test on the
frozen source's features of real digit scans. It flags a brightness shift and a class the
champion never saw, not a fresh sample of the same data; `on_drift` then skips the
expensive steps when there is nothing new, or nothing that drifted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from transferops.config import Config, validate_config
from transferops.data.prepare import prepare
from transferops.evaluation.drift import compare, decide_retrain, save_reference, source_features
from transferops.pipeline.run import run_pipeline

from .conftest import write_image_folder

NAMES = ["one", "two", "zero"]


def _cfg(root: Path, raw: Path, source: Path, out: str = "prep") -> Config:
    return validate_config(
        {
            "data": {
                "demo": None,
                "path": str(raw),
                "out": str(root / out),
                "image": {"size": 32},
                "limit_per_class": None,
                "splits": {"train": 0.8, "val": 0.1, "test": 0.1},
            },
            "source": {"out": str(source)},
            "schedule": {"retrain": "on_drift", "reference": str(root / "ref.safetensors")},
            "search": {"storage": f"sqlite:///{root}/optuna.db"},
            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "d"},
        }
    )


def _brighten(src: Path, dst: Path, prefix: str = "") -> None:
    """The same scans, much brighter (what a new camera or exposure does)."""
    for p in src.rglob("*.png"):
        out = dst / p.parent.name / f"{prefix}{p.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        img = np.asarray(Image.open(p).convert("RGB")).astype(np.float32)
        Image.fromarray(np.clip(img * 0.4 + 150, 0, 255).astype(np.uint8)).save(out)


def test_flags_a_brightness_shift_and_a_new_class_not_a_fresh_sample(tmp_path, lite0_source):
    write_image_folder(tmp_path / "a", per_class=40)
    _brighten(tmp_path / "a", tmp_path / "b")
    prepared = _cfg(tmp_path, tmp_path / "a", lite0_source)
    prepare(prepared)
    x, y, _ = source_features(prepared)
    bright = _cfg(tmp_path, tmp_path / "b", lite0_source, out="prep-b")
    prepare(bright)
    xb, yb, _ = source_features(bright)
    ref, fresh = (x[::2], y[::2], NAMES), (x[1::2], y[1::2], NAMES)
    same = compare(ref, fresh, 0.05)
    shifted = compare(ref, (xb[1::2], yb[1::2], NAMES), 0.05)
    assert not same.drifted and same.p_value >= 0.05
    assert shifted.drifted and shifted.p_value < 0.01 and shifted.mmd2 > 5 * same.mmd2
    # a class the champion was never trained on: drift, named in the per-class results
    seen = y[::2] != NAMES.index("two")
    held_back = compare((x[::2][seen], y[::2][seen], ["one", "zero"]), fresh, 0.05)
    assert held_back.drifted and held_back.per_class["two"]["p_value"] == 0.0


def test_on_drift_retrains_only_on_new_data_that_drifted(tmp_path, lite0_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "raw"
    write_image_folder(raw, per_class=30)
    cfg = _cfg(tmp_path, raw, lite0_source)
    prepare(cfg)
    save_reference(cfg)  # what a promotion does: this data is the champion's
    summary = run_pipeline(cfg)  # a scheduled run, nothing new: the expensive steps skip
    assert summary["retrain"] == "skipped: no new data since the champion"
    assert "study" not in summary and "test_accuracy" not in summary
    assert not (tmp_path / ".transferops" / "steps" / "search.json").exists()  # never ran
    write_image_folder(raw, per_class=45)  # 15 new scans per class, the same kind
    prepare(cfg)
    fresh = decide_retrain(cfg)
    assert not fresh["retrain"] and "no drift" in fresh["reason"]
    assert 0 < fresh["drift"]["n_new"] < 45 * 3  # only the new examples are tested
    _brighten(raw, raw, prefix="bright-")  # new scans from a brighter camera
    prepare(cfg)
    drifted = decide_retrain(cfg)
    assert drifted["retrain"] and "drifted" in drifted["reason"]
