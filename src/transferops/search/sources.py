"""Which pretrained source to transfer from, chosen in seconds before any training.

The first decision of transfer learning is the source. Each name in ``source.candidates`` is
pulled into a scratch folder, its pooled features are computed once on the prepared train
and val splits, and the exact linear probe (:func:`transferops.finetune.probe.fit_probe`) is
fitted on them. Candidates are ranked by that probe's val log-loss: a proper score, far less
coarse than accuracy on a few hundred val examples (the same criterion picks the probe's
regularisation).

Cost: a bigger source costs every later epoch more (feature time grows with the model and
with the image size squared). So the chosen candidate is the *cheapest* one whose val loss is
not worse than the best candidate's by more than validation noise: one standard error of the
paired per-example loss differences. "Cheaper" is smaller weights (a deterministic order;
the CPU seconds its features took are recorded too, but a shared machine reorders them).
The winner is pulled into ``source.out``; the ranking (every candidate's val loss and
accuracy, seconds, and why the winner won) is kept in its manifest (``ranking``), so the
model folders, the report and the model card carry it.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferops.config import Config, with_overrides
from transferops.data.prepared import PreparedData, load_prepared, read_manifest
from transferops.errors import ConfigError, SourceError
from transferops.finetune.features import frozen_features
from transferops.finetune.probe import fit_probe, log_losses, paired_se
from transferops.model.inputs import pick_device
from transferops.runtime.artifacts import read_json, sha256_json
from transferops.sources.efficientnet_lite import PACKAGED
from transferops.sources.manifest import MANIFEST
from transferops.sources.pull import PullResult, pull, pull_from_config

log = logging.getLogger(__name__)

__all__ = ["Ranked", "candidate_names", "choose", "pull_best", "rank_sources"]


@dataclass
class Ranked:
    """One candidate source scored by its exact probe on val."""

    name: str
    val_loss: float
    val_accuracy: float
    C: float
    feat_dim: int
    cpu_s: float  # CPU seconds of its features on train + val (shown; noisy on a shared box)
    wall_s: float
    losses: np.ndarray  # per-example val log-loss (for the paired noise test; not written)
    weights_mb: float = 0.0  # size of its weights: the cost order (deterministic)

    def row(self) -> dict[str, Any]:
        """The JSON-able part."""
        return {k: v for k, v in asdict(self).items() if k != "losses"}


def score_candidate(
    cfg: Config, name: str, train: PreparedData, val: PreparedData, work: Path
) -> Ranked:
    """Pull `name` into `work`, compute its pooled features on train and val once, and fit
    the exact probe on them."""
    sub = cfg.source.model_copy(update={"name": name, "out": work / name, "candidates": None})
    pulled = pull(sub, registry_uri=cfg.source.registry_uri or cfg.tracking.uri)
    image_size = read_manifest(cfg.data.out).get("image_size") or None
    device = pick_device(cfg.finetune.device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    feats = {
        k: v.double().numpy()
        for k, v in frozen_features(
            sub.out,
            {"train": train, "val": val},
            image_size,
            cfg.finetune.max_length,
            device,
            cfg.finetune.batch_size * 2,
        ).items()
    }
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ytr, yva = train.labels.numpy(), val.labels.numpy()
    fit = fit_probe(feats["train"], ytr, feats["val"], yva, len(train.class_names))
    logits = feats["val"] @ fit.weight.double().numpy().T + fit.bias.double().numpy()
    weights_mb = (sub.out / pulled.manifest["weights_file"]).stat().st_size / 1e6
    return Ranked(
        name,
        fit.val_loss,
        fit.val_accuracy,
        fit.C,
        feats["val"].shape[1],
        cpu,
        wall,
        log_losses(logits, yva),
        round(weights_mb, 1),
    )


def choose(ranked: list[Ranked]) -> tuple[Ranked, str]:
    """The cheapest candidate whose val loss is within one standard error (of the paired
    per-example differences) of the lowest; with the reason, for the log and the report."""
    best = min(ranked, key=lambda r: (r.val_loss, -r.val_accuracy))
    # cheapest first: by the weights' size (a measured time would reorder them on a busy box)
    for r in sorted(ranked, key=lambda r: (r.weights_mb, r.cpu_s)):
        if r is best:
            return r, f"lowest val log-loss ({r.val_loss:.4f})"
        d = r.losses - best.losses
        se = paired_se(d)
        if float(d.mean()) <= se:
            return r, (
                f"val log-loss {r.val_loss:.4f} is within noise of the lowest ({best.name}: "
                f"{best.val_loss:.4f}, difference {d.mean():+.4f}, 1 SE {se:.4f}) and it is "
                f"smaller ({r.weights_mb:.0f} MB of weights against {best.weights_mb:.0f})"
            )
    raise AssertionError("unreachable: the best candidate is in the list")


def candidate_names(cfg: Config) -> list[str]:
    """``source.candidates`` as names (``auto``: the packaged weights of the source's kind,
    else ``source.name`` alone), without repeats."""
    wanted = cfg.source.candidates
    if wanted == "auto":
        packaged = cfg.source.kind == "efficientnet_lite" and cfg.source.weights == "packaged"
        wanted = list(PACKAGED) if packaged else [cfg.source.name]
    return list(dict.fromkeys(wanted or [cfg.source.name]))


def rank_sources(cfg: Config) -> dict[str, Any]:
    """Score every ``source.candidates`` name on the prepared train/val data (never test);
    returns the ranking record (``chosen``, ``why``, ``candidates`` best first)."""
    names = candidate_names(cfg)
    train = load_prepared(cfg.data.out, "train")
    val = load_prepared(cfg.data.out, "val")
    ranked = []
    with tempfile.TemporaryDirectory(prefix="transferops-rank-") as work:
        for i, name in enumerate(names, 1):
            try:
                r = score_candidate(cfg, name, train, val, Path(work))
            except SourceError as exc:
                raise SourceError(f"source.candidates[{i - 1}] {name}: {exc}") from None
            log.info(
                "source %d/%d %s: probe val loss %.4f, accuracy %.4f (features %.1f CPU s)",
                i,
                len(names),
                name,
                r.val_loss,
                r.val_accuracy,
                r.cpu_s,
            )
            ranked.append(r)
    chosen, why = choose(ranked)
    log.info("source: %s (%s)", chosen.name, why)
    return {
        "chosen": chosen.name,
        "why": why,
        "criterion": "exact probe val log-loss; the smallest within 1 SE of the lowest",
        "candidates": [r.row() for r in sorted(ranked, key=lambda r: r.val_loss)],
    }


def pull_best(cfg: Config, force: bool = False) -> PullResult:
    """`pull` as every door calls it: with two or more ``source.candidates``, rank them on
    the prepared data first (again only when the data or the source params change) and pull
    the chosen one; otherwise pull ``source.name``."""
    if len(candidate_names(cfg)) < 2:
        return pull_from_config(cfg, force=force)
    if cfg.source.kind == "mlflow":
        raise ConfigError("source.candidates: not for kind mlflow (one registered model)")
    out = Path(cfg.source.out)
    key = sha256_json(
        {
            "source": cfg.source.model_dump(mode="json", exclude={"out", "name"}),
            "data_hash": read_manifest(cfg.data.out)["data_hash"],
            "finetune.max_length": cfg.finetune.max_length,
        }
    )
    previous = (read_json(out / MANIFEST).get("ranking") or {}) if (out / MANIFEST).exists() else {}
    if not force and previous.get("key") == key:
        ranking = previous
        log.info("source ranking up to date: %s", ranking["chosen"])
    else:
        ranking = {"key": key, **rank_sources(cfg)}
    chosen = with_overrides(cfg, {"source.name": ranking["chosen"]})
    return pull_from_config(chosen, force=force, ranking=ranking)
