"""Which pretrained source, and at which input size, to transfer from: chosen in seconds,
before any training.

The first decisions of transfer learning are the source and the size of the images it sees.
Each name in ``source.candidates`` is pulled into a scratch folder, its pooled features are
computed once on the prepared train and val splits, and the exact linear probe
(:func:`transferops.finetune.probe.fit_probe`) is fitted on them. Candidates are ranked by that
probe's val log-loss: a proper score, far less coarse than accuracy on a few hundred val
examples (the same criterion picks the probe's regularisation).

Sizes (``source.sizes``): the prepared images can be shown to the network upsampled (the
model resizes its input, :class:`transferops.model.inputs.Preprocess`, so serving does the
same). Frozen features of small images gain from it: an ImageNet backbone sees their objects
nearer the scale it was trained on (a 64-px folder: exact probe +3.6 test points at 128 px;
fine-tuning, which adapts to the small scale, gained nothing there: bench/RESULTS.md). Sizes
are ranked for the source that won at the prepared size (one feature pass per extra size, not
one per source and size: on the four benchmark cases the greedy order picked what the full
grid picked).

Cost: a bigger source or size costs every later epoch more: the forward GFLOPs per image,
counted (:func:`image_gflops`: deterministic, unlike seconds on a shared machine; ~4x from 64
to 128 px). So the chosen candidate is the *cheapest* one whose val loss is not worse than
the best candidate's by more than validation noise: one standard error of the paired
per-example loss differences. A 4x dearer size is taken only when it is better beyond that
noise. The winner is pulled into ``source.out`` (with ``input.size`` in its manifest when it
is not the prepared size); the ranking (every candidate's val loss and accuracy, GFLOPs,
seconds, and why the winner won) is kept in its manifest (``ranking``), so the model folders,
the report and the model card carry it.
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
from transferops.data.prepared import MANIFEST as PREPARED_MANIFEST
from transferops.data.prepared import PreparedData, load_prepared, read_manifest
from transferops.errors import ConfigError, SourceError
from transferops.finetune.features import frozen_features, image_gflops
from transferops.finetune.probe import fit_probe, log_losses, paired_se
from transferops.model.inputs import pick_device, text_fit
from transferops.runtime.artifacts import read_json, sha256_json
from transferops.sources.efficientnet_lite import PACKAGED
from transferops.sources.manifest import MANIFEST
from transferops.sources.pull import PullResult, pull, pull_from_config

log = logging.getLogger(__name__)

__all__ = [
    "Ranked",
    "candidate_names",
    "candidate_sizes",
    "choose",
    "pull_best",
    "rank_sources",
]


@dataclass
class Ranked:
    """One candidate (source, input size) scored by its exact probe on val."""

    name: str
    size: int | None  # the side the network sees (None: text)
    val_loss: float
    val_accuracy: float
    C: float
    feat_dim: int
    cpu_s: float  # CPU seconds of its features on train + val (shown; noisy on a shared box)
    wall_s: float
    losses: np.ndarray  # per-example val log-loss (for the paired noise test; not written)
    weights_mb: float = 0.0  # size of its weights (the cost order where no GFLOPs are counted)
    gflops: float | None = None  # forward GFLOPs per image: the cost order (images)

    @property
    def label(self) -> str:
        return f"{self.name} @ {self.size} px" if self.size else self.name

    def row(self) -> dict[str, Any]:
        """The JSON-able part."""
        return {k: v for k, v in asdict(self).items() if k != "losses"}


def score_candidate(
    cfg: Config,
    name: str,
    size: int | None,
    splits: tuple[PreparedData, PreparedData],
    work: Path,
) -> Ranked:
    """Pull `name` into `work` as it would be pulled at input side `size`, compute its pooled
    features on train and val once, and fit the exact probe on them."""
    train, val = splits
    image_size = read_manifest(cfg.data.out).get("image_size") or None
    sub = cfg.source.model_copy(
        update={"name": name, "out": work / f"{name}@{size}", "candidates": None, "sizes": None}
    )
    resized = {"input_size": size} if size and size != image_size else None
    pulled = pull(sub, registry_uri=cfg.source.registry_uri or cfg.tracking.uri, ranking=resized)
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
            cfg.finetune.precision,
        ).items()
    }
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ytr, yva = train.labels.numpy(), val.labels.numpy()
    fit = fit_probe(feats["train"], ytr, feats["val"], yva, len(train.class_names))
    logits = feats["val"] @ fit.weight.double().numpy().T + fit.bias.double().numpy()
    weights_mb = (sub.out / pulled.manifest["weights_file"]).stat().st_size / 1e6
    return Ranked(
        name,
        size,
        fit.val_loss,
        fit.val_accuracy,
        fit.C,
        feats["val"].shape[1],
        cpu,
        wall,
        log_losses(logits, yva),
        round(weights_mb, 1),
        float(f"{image_gflops(sub.out, image_size):.4g}") if image_size else None,
    )


def _cost(r: Ranked) -> str:
    return f"{r.gflops:.2f} GFLOPs per image" if r.gflops is not None else f"{r.weights_mb:.0f} MB"


def choose(ranked: list[Ranked]) -> tuple[Ranked, str]:
    """The cheapest candidate whose val loss is within one standard error (of the paired
    per-example differences) of the lowest; with the reason, for the log and the report."""
    best = min(ranked, key=lambda r: (r.val_loss, -r.val_accuracy))
    # cheapest first: counted GFLOPs, then the weights' size (a measured time would reorder
    # them on a busy box)
    for r in sorted(ranked, key=lambda r: (r.gflops or 0.0, r.weights_mb, r.cpu_s)):
        if r is best:
            return r, f"lowest val log-loss ({r.val_loss:.4f})"
        d = r.losses - best.losses
        se = paired_se(d)
        if float(d.mean()) <= se:
            return r, (
                f"val log-loss {r.val_loss:.4f} is within noise of the lowest ({best.label}: "
                f"{best.val_loss:.4f}, difference {d.mean():+.4f}, 1 SE {se:.4f}) and it is "
                f"cheaper ({_cost(r)} against {_cost(best)})"
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


def candidate_sizes(cfg: Config) -> list[int | None]:
    """``source.sizes`` resolved against the prepared images' side `p` (``[None]`` for text):
    ``auto`` = p, and twice p up to ``data.image.auto_max`` (the CPU budget that caps the
    decoded size; one doubling at most: 4x the cost of every epoch). The model only upsamples
    (a smaller side is decoded smaller, by ``data.image.size``), so a size below p is
    refused."""
    p = read_manifest(cfg.data.out).get("image_size")
    wanted = cfg.source.sizes
    if not p:
        return [None]
    if wanted is None or cfg.source.kind == "mlflow":  # a registered model keeps its own
        return [p]
    if wanted == "auto":
        return sorted({p, max(p, min(2 * p, cfg.data.image.auto_max))})
    low = [s for s in wanted if s < p]
    if low:
        raise ConfigError(
            f"source.sizes: {low} below the prepared images' {p} px; the model only upsamples "
            f"its input. To train on smaller images set data.image.size: {min(low)}"
        )
    return sorted({p, *wanted})


def _score_all(
    cfg: Config, todo: list[tuple[str, int | None]], splits: tuple, work: Path, done: int
) -> list[Ranked]:
    """Score each (name, size), logging each as it finishes."""
    out = []
    for name, size in todo:
        try:
            r = score_candidate(cfg, name, size, splits, work)
        except SourceError as exc:
            raise SourceError(f"source.candidates: {name}: {exc}") from None
        done += 1
        log.info(
            "source candidate %d: %s: probe val loss %.4f, accuracy %.4f (%s; features %.1f CPU s)",
            done,
            r.label,
            r.val_loss,
            r.val_accuracy,
            _cost(r),
            r.cpu_s,
        )
        out.append(r)
    return out


def rank_sources(cfg: Config) -> dict[str, Any]:
    """Score every ``source.candidates`` name at the prepared size, then the best of them at
    each larger ``source.sizes`` side, on the prepared train/val data (never test); returns the
    ranking record (``chosen``, ``input_size``, ``why``, ``candidates`` best first)."""
    names, sizes = candidate_names(cfg), candidate_sizes(cfg)
    splits = (load_prepared(cfg.data.out, "train"), load_prepared(cfg.data.out, "val"))
    with tempfile.TemporaryDirectory(prefix="transferops-rank-") as tmp:
        work = Path(tmp)
        ranked = _score_all(cfg, [(n, sizes[0]) for n in names], splits, work, 0)
        if len(sizes) > 1:
            lead, _ = choose(ranked)
            log.info("sizes %s for %s (the source chosen at %s px)", sizes[1:], lead.name, sizes[0])
            more = [(lead.name, s) for s in sizes[1:]]
            ranked += _score_all(cfg, more, splits, work, len(ranked))
    chosen, why = choose(ranked)
    log.info("source: %s (%s)", chosen.label, why)
    return {
        "chosen": chosen.name,
        # the side the model resizes its input to; None = the prepared images' own
        "input_size": chosen.size if chosen.size != sizes[0] else None,
        "why": why,
        "criterion": "exact probe val log-loss; the cheapest (GFLOPs per image) within 1 SE "
        "of the lowest",
        "candidates": [r.row() for r in sorted(ranked, key=lambda r: r.val_loss)],
    }


def pull_best(cfg: Config, force: bool = False) -> PullResult:
    """`pull` as every door calls it: with two or more ``source.candidates`` or
    ``source.sizes``, rank them on the prepared data first (again only when the data or the
    source params change) and pull the chosen one at the chosen size; otherwise pull
    ``source.name``. A text source is then checked against the prepared texts
    (:func:`say_text_fit`)."""
    result = _pull_best(cfg, force)
    if result.manifest.get("input", {}).get("type") == "text":
        say_text_fit(cfg, result)
    return result


# more than this share of the training texts cut at finetune.max_length, or of their word
# pieces unknown to the tokenizer, is worth a warning before the search spends its budget
TEXT_CUT_WARN = 0.10
TEXT_UNKNOWN_WARN = 0.05


def say_text_fit(cfg: Config, pulled: PullResult) -> dict[str, float] | None:
    """Warn, before any training, when the source's tokenizer fits the prepared training
    texts badly: many cut at ``finetune.max_length`` (with the length that keeps 90% whole),
    or many word pieces it does not know (another language or script). None when the data
    is not prepared yet."""
    if not (Path(cfg.data.out) / PREPARED_MANIFEST).exists():
        return None
    texts = load_prepared(cfg.data.out, "train").texts or []
    fit = text_fit(texts, pulled.out, pulled.manifest, cfg.finetune.max_length)
    log.info(
        "training texts: median %d tokens, 90%% within %d (finetune.max_length %d)",
        fit["median_tokens"],
        fit["p90_tokens"],
        cfg.finetune.max_length,
    )
    if fit["cut"] > TEXT_CUT_WARN:
        keep = min(512, -(-int(fit["p90_tokens"]) // 32) * 32)
        log.warning(
            "%.0f%% of the training texts are longer than finetune.max_length (%d tokens) and "
            "are cut to it: the model never sees their ends. finetune.max_length: %d keeps 90%% "
            "of them whole (the text encoder's time grows with the tokens it reads)",
            100 * fit["cut"],
            cfg.finetune.max_length,
            keep,
        )
    if fit["unknown"] > TEXT_UNKNOWN_WARN:
        note = pulled.manifest["input"].get("note")
        log.warning(
            "%.0f%% of the training texts' word pieces are unknown to %s's vocabulary ([UNK]): "
            "the texts are largely in a language or script it was not trained on%s; choose an "
            "encoder for that language (source.name)",
            100 * fit["unknown"],
            pulled.manifest.get("name", cfg.source.name),
            f" ({note})" if note else "",
        )
    return fit


def _pull_best(cfg: Config, force: bool) -> PullResult:
    if len(candidate_names(cfg)) < 2 and len(candidate_sizes(cfg)) < 2:
        return pull_from_config(cfg, force=force)
    if cfg.source.kind == "mlflow":
        raise ConfigError("source.candidates: not for kind mlflow (one registered model)")
    out = Path(cfg.source.out)
    key = sha256_json(
        {
            "source": cfg.source.model_dump(mode="json", exclude={"out", "name"}),
            "data_hash": read_manifest(cfg.data.out)["data_hash"],
            "finetune.max_length": cfg.finetune.max_length,
            "sizes": candidate_sizes(cfg),  # auto follows data.image.auto_max
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
