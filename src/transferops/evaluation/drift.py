"""Should a (scheduled) run retrain? Compare the data it finds with the champion's.

``schedule.retrain``:

- ``always``: every run retrains (unchanged steps are still skipped by their fingerprints);
- ``on_new_data``: only when the prepared data differs from the data the champion was
  trained on (its data hash);
- ``on_drift``: only when it differs *and* has drifted from it in the source model's feature
  space: a kernel two-sample test (MMD, RBF kernel with the median-distance bandwidth, on
  L2-normalised pooled features of the frozen source) with a permutation p-value, overall
  and per class; drift when the overall p-value is below ``schedule.drift_alpha`` or a
  class's is below it divided by the number of classes (Bonferroni).

The reference (``schedule.reference``) is written whenever a run makes a new champion: the
champion's data hash, a sample of its training features and a content hash of every
training example, so that only the examples it never saw are tested. No reference yet
means retrain.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from transferops.config import Config
from transferops.data.prepared import load_prepared, read_manifest
from transferops.finetune.features import frozen_features
from transferops.runtime.artifacts import publish_modes, read_json
from transferops.sources.manifest import source_id

log = logging.getLogger(__name__)
MAX_SAMPLE = 400  # per side: the test's cost grows with its square
PERMUTATIONS = 200
MIN_CLASS = 5  # examples per side for a per-class test


@dataclass(frozen=True)
class Drift:
    """The two-sample test between the champion's training data and the new data."""

    mmd2: float
    p_value: float
    n_reference: int
    n_new: int
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    drifted: bool = False


def example_keys(data: Any) -> np.ndarray:
    """One 64-bit content hash per example (image bytes or text): which examples are new."""
    rows = (
        [bytes(x.numpy().tobytes()) for x in data.images]
        if data.modality == "image"
        else [t.encode() for t in data.texts]
    )
    return np.array(
        [int.from_bytes(hashlib.blake2b(r, digest_size=8).digest(), "little") for r in rows],
        dtype=np.uint64,
    )


# (source weights, split file and its state, max_length) -> features: the drift check and
# `adapt` in one scheduled run read the same splits through the same frozen source
_FEATURES: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def source_features(cfg: Config, split: str = "train") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled features of the frozen pretrained source on a prepared split, labels, keys
    (computed once per process for the same source weights and split file)."""
    weights = source_id(read_json(Path(cfg.source.out) / "manifest.json"))
    out = Path(cfg.data.out)
    files = [out / f"{split}{ext}" for ext in (".safetensors", ".jsonl")]  # images, texts
    state = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())
    key = (weights, str(out.resolve()), split, state, cfg.finetune.max_length)
    if key not in _FEATURES:
        size = read_manifest(cfg.data.out).get("image_size") or None
        data = load_prepared(cfg.data.out, split)  # type: ignore[arg-type]
        cpu = torch.device("cpu")
        feats = frozen_features(
            cfg.source.out, {split: data}, size, cfg.finetune.max_length, cpu, 64
        )
        if len(_FEATURES) >= 8:
            _FEATURES.pop(next(iter(_FEATURES)))
        _FEATURES[key] = (feats[split].numpy(), data.labels.numpy(), example_keys(data))
    return _FEATURES[key]


def mmd_test(
    x: np.ndarray, y: np.ndarray, seed: int = 0, permutations: int = PERMUTATIONS
) -> tuple[float, float]:
    """(MMD², permutation p-value) of samples `x` and `y` (rows), RBF kernel."""
    rng = np.random.default_rng(seed)
    x = x[rng.permutation(len(x))[:MAX_SAMPLE]]
    y = y[rng.permutation(len(y))[:MAX_SAMPLE]]
    z = np.vstack([x, y]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12  # scale-free: directions only
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2 * z @ z.T, 0)
    bandwidth = np.median(d2[d2 > 0]) if (d2 > 0).any() else 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(x)

    def stat(idx: np.ndarray) -> float:
        a, b = idx[:n], idx[n:]
        return k[np.ix_(a, a)].mean() + k[np.ix_(b, b)].mean() - 2 * k[np.ix_(a, b)].mean()

    observed = stat(np.arange(len(z)))
    null = np.array([stat(rng.permutation(len(z))) for _ in range(permutations)])
    return float(observed), float((1 + (null >= observed).sum()) / (1 + permutations))


def compare(
    ref: tuple[np.ndarray, np.ndarray, list[str]],
    new: tuple[np.ndarray, np.ndarray, list[str]],
    alpha: float,
) -> Drift:
    """The overall and per-class tests (classes matched by name), and the decision; a class
    the reference never had is drift by itself."""
    (rx, ry, rnames), (nx, ny, nnames) = ref, new
    mmd2, p = mmd_test(rx, nx)
    per_class = {}
    for name in nnames:
        if name not in rnames:
            per_class[name] = {"mmd2": float("nan"), "p_value": 0.0, "n_reference": 0}
            continue
        a, b = rx[ry == rnames.index(name)], nx[ny == nnames.index(name)]
        if min(len(a), len(b)) >= MIN_CLASS:
            m, pc = mmd_test(a, b, seed=len(per_class) + 1, permutations=100)
            per_class[name] = {"mmd2": m, "p_value": pc, "n_reference": len(a), "n_new": len(b)}
    strict = alpha / max(1, len(nnames))
    drifted = p < alpha or any(v["p_value"] < strict for v in per_class.values())
    return Drift(mmd2, p, len(rx), len(nx), per_class, drifted)


def load_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return f.metadata() or {}


def save_reference(cfg: Config) -> Path:
    """Remember the current data as the champion's: its hash, a feature sample and every
    training example's content hash (a few seconds of feature extraction)."""
    manifest = read_manifest(cfg.data.out)
    path = Path(cfg.schedule.reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"data_hash": np.frombuffer(bytes.fromhex(manifest["data_hash"]), np.uint8)}
    feats, labels, keys = source_features(cfg)
    keep = np.random.default_rng(0).permutation(len(feats))[: 4 * MAX_SAMPLE]
    tensors |= {
        "features": feats[keep].astype(np.float32),
        "labels": labels[keep],
        "keys": keys,  # every training example's: the next run tests only new ones
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"class_names": "\n".join(manifest["class_names"])})
    publish_modes(tmp)
    tmp.replace(path)
    return path


def decide_retrain(cfg: Config) -> dict[str, Any]:
    """Whether this run retrains, why, and the drift test when one ran; ``adapt`` when the
    labelled data gives no reason to retrain but the unlabelled images of the serving domain
    (``data.unlabelled``) drifted from the champion's data (on_drift), or are simply there
    (always / on_new_data): adapting needs no labels and costs seconds."""
    decision = _labelled_decision(cfg)
    if decision["retrain"] or "unlabelled" not in (
        read_manifest(cfg.data.out).get("domains") or {}
    ):
        return decision | {"adapt": False}
    if cfg.schedule.retrain != "on_drift" or not Path(cfg.schedule.reference).exists():
        return decision | {
            "adapt": True,
            "reason": decision["reason"] + "; data.unlabelled: adapting",
        }
    d = domain_drift(cfg)
    verdict = "drifted" if d.drifted else "no drift"
    reason = (
        f"{decision['reason']}; data.unlabelled ({d.n_new} images) {verdict} from the "
        f"champion's data (MMD² {d.mmd2:.4f}, p {d.p_value:.3f})"
        + (
            ": adapting to it (no labels needed; a full retrain needs labelled examples of it)"
            if d.drifted
            else ""
        )
    )
    log.info("drift check: %s", reason)
    return decision | {"adapt": d.drifted, "reason": reason, "domain_drift": asdict(d)}


def domain_drift(cfg: Config) -> Drift:
    """The MMD test of the unlabelled serving-domain images against the champion's reference
    features (overall only: they have no labels)."""
    ref = load_file(str(cfg.schedule.reference))
    feats, _, _ = source_features(cfg, "unlabelled")
    mmd2, p = mmd_test(ref["features"], feats)
    return Drift(mmd2, p, len(ref["features"]), len(feats), {}, p < cfg.schedule.drift_alpha)


def _labelled_decision(cfg: Config) -> dict[str, Any]:
    """Whether the labelled data calls for a retrain (schedule.retrain)."""
    mode, path = cfg.schedule.retrain, Path(cfg.schedule.reference)
    manifest = read_manifest(cfg.data.out)
    if mode == "always":
        return {"retrain": True, "reason": "schedule.retrain: always", "drift": None}
    if not path.exists():
        return {"retrain": True, "reason": f"no champion reference yet ({path})", "drift": None}
    ref = load_file(str(path))
    if bytes(ref["data_hash"]).hex() == manifest["data_hash"]:
        return {"retrain": False, "reason": "no new data since the champion", "drift": None}
    if mode == "on_new_data":
        return {"retrain": True, "reason": "new data since the champion", "drift": None}
    ref_names = load_metadata(path)["class_names"].split("\n")
    feats, labels, keys = source_features(cfg)
    fresh = ~np.isin(keys, ref["keys"])  # the champion's own examples would dilute a shift
    if not fresh.any():
        return {"retrain": False, "reason": "no new training examples", "drift": None}
    d = compare(
        (ref["features"], ref["labels"], ref_names),
        (feats[fresh], labels[fresh], manifest["class_names"]),
        cfg.schedule.drift_alpha,
    )
    verdict = "drifted" if d.drifted else "no drift"
    reason = (
        f"{int(fresh.sum())} new training examples, {verdict} from the champion's "
        f"(MMD² {d.mmd2:.4f}, p {d.p_value:.3f})"
    )
    log.info("drift check: %s", reason)
    return {"retrain": d.drifted, "reason": reason, "drift": asdict(d)}
