"""`transferops promote`: move the alias ``champion`` to the challenger only through gates.

The decision is split in two. :func:`evidence` does the looking up: the challenger's and
champion's versions and tags, and, when the champion was registered on other data, its
re-score on the challenger's test split. :func:`gate` is a pure function of those numbers
and the rule:

1. baseline gate: the challenger beats the from-scratch baseline
   (``registry.baseline_gate``: ``significant`` = the lower end of the transfer - scratch
   interval is above 0, or, for a classical candidate (train kept logistic regression on
   pixels: transfer's verdict is not about it), of its own paired interval against scratch;
   ``mean`` = its test metric is above the scratch mean);
2. cheap-baseline gate (``registry.cheap_gate``): no cheap alternative (the exact linear
   probe, the classical model) beats it significantly: the upper end of its paired-bootstrap
   interval of test accuracy minus that baseline's is not below 0. A user is never handed a
   model that something fitted in seconds beats;
3. champion gate: its test ``registry.metric`` beats the champion's by more than 0 and at
   least ``registry.min_improvement``, on the same test split. The first model passes it; a
   champion trained on other classes cannot be compared and is replaced when gates 1-2 pass.

Otherwise nothing changes and the decision says why.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from transferops.config import Config, RegistryConfig, registered_model_name
from transferops.data.prepared import read_manifest
from transferops.errors import RegistryError
from transferops.evaluation.evaluate import score_model_dir
from transferops.registry.client import CHALLENGER, CHAMPION, download_model_folder
from transferops.runtime.tracking import setup_tracking

log = logging.getLogger(__name__)

CHEAP = ("probe", "classical")  # the baselines fitted in seconds that a model must not lose to
BOUNDS = ("mean", "ci_low", "ci_high")


@dataclass
class Decision:
    """What `promote` decided, and why."""

    promote: bool
    name: str
    challenger: str | None
    champion: str | None
    reasons: list[str] = field(default_factory=list)
    challenger_metric: float | None = None
    champion_metric: float | None = None
    applied: bool = False

    def summary(self) -> str:
        """One line for humans."""
        head = (
            f"promote {self.name} v{self.challenger} to {CHAMPION}"
            if self.promote
            else f"keep {self.name} {CHAMPION} "
            + (f"v{self.champion}" if self.champion else "(none)")
        )
        return f"{head}: " + "; ".join(self.reasons)


@dataclass(frozen=True)
class Evidence:
    """The numbers the gate decides on (looked up by :func:`evidence`)."""

    name: str
    challenger: str  # version
    challenger_metric: float  # its test metric
    scratch_mean: float  # the from-scratch baseline's mean test metric
    gain_low: float | None  # lower end of the transfer - scratch interval (None: one seed)
    verdict: str  # evaluate's verdict line, quoted in the reason
    candidate: str = "finetuned"  # or "classical" (train.keep_best_candidate)
    # baseline (probe, classical, scratch) -> (mean, ci_low, ci_high) of this model's test
    # accuracy minus the baseline's, paired over the test examples
    minus: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # test recall 0, the probe's above 0
    champion: str | None = None  # version, None when there is none
    champion_metric: float | None = None  # on the challenger's test split; None: not comparable
    champion_note: str = ""  # how champion_metric was obtained, or why there is none


def gate(ev: Evidence, rule: RegistryConfig) -> Decision:
    """The promotion decision from numbers alone (no registry access)."""
    d = Decision(False, ev.name, ev.challenger, ev.champion, challenger_metric=ev.challenger_metric)
    if ev.champion == ev.challenger:
        d.reasons.append(f"v{ev.challenger} is already the {CHAMPION}")
        return d
    metric = rule.metric
    vs_scratch = ev.minus.get("scratch")  # this model - scratch (paired, test examples)
    if rule.baseline_gate == "significant" and ev.candidate == "classical" and vs_scratch:
        beats = vs_scratch[1] > 0
        detail = f"the classical candidate vs scratch {_points(vs_scratch)} points"
    elif rule.baseline_gate == "significant":
        beats = ev.gain_low is not None and ev.gain_low > 0
        detail = ev.verdict
    else:
        beats = ev.challenger_metric > ev.scratch_mean
        detail = f"test {metric} {ev.challenger_metric:.4f} vs scratch mean {ev.scratch_mean:.4f}"
    d.reasons.append(f"{'passes' if beats else 'fails'} the baseline gate ({detail})")
    cheap = {r: diff for r, diff in ev.minus.items() if r in CHEAP}
    if rule.cheap_gate and cheap:
        cheap_ok, detail = _cheap_gate(cheap)
        d.reasons.append(f"{'passes' if cheap_ok else 'fails'} the cheap-baseline gate ({detail})")
        beats = beats and cheap_ok
    if rule.dropped_class_gate and ev.dropped:
        d.reasons.append(
            f"fails the dropped-class gate (class {', '.join(ev.dropped)}: recall 0 on test, "
            "where the exact probe recognises some)"
        )
        beats = False
    if ev.champion is None:
        d.reasons.append("no champion yet (first model)")
        d.promote = beats
        return d
    d.champion_metric = ev.champion_metric
    if ev.champion_metric is None:
        d.reasons.append(f"v{ev.champion}: {ev.champion_note}; the challenger replaces it")
        d.promote = beats
        return d
    gain = ev.challenger_metric - ev.champion_metric
    wins = gain > 0 and gain >= rule.min_improvement
    d.reasons.append(
        f"{'beats' if wins else 'does not beat'} {CHAMPION} v{ev.champion}: test {metric} "
        f"{ev.challenger_metric:.4f} vs {ev.champion_metric:.4f} ({ev.champion_note}; gain "
        f"{gain:+.4f}, needed > 0 and >= {rule.min_improvement})"
    )
    d.promote = beats and wins
    return d


def _cheap_gate(cheap: dict[str, tuple[float, float, float]]) -> tuple[bool, str]:
    """Whether no cheap baseline beats the model significantly; the differences, in points."""
    better = [r for r, (_, _, hi) in cheap.items() if hi < 0]
    detail = ", ".join(
        f"{'beaten by' if r in better else 'vs'} {r} {_points(d)} points" for r, d in cheap.items()
    )
    return not better, detail


def _points(d: tuple[float, float, float]) -> str:
    m, lo, hi = (x * 100 for x in d)
    return f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _float_tag(version: Any, key: str) -> float | None:
    value = version.tags.get(key)
    return float(value) if value not in (None, "None", "") else None


def _metric_tag(version: Any, key: str) -> float:
    value = _float_tag(version, key)
    return value if value is not None else math.nan


def _champion_metric(cfg: Config, champion: Any, challenger: Any) -> tuple[float | None, str]:
    """The champion's test metric on the challenger's test split, and how it was obtained."""
    metric = cfg.registry.metric
    if champion.tags.get("data_hash") == challenger.tags.get("data_hash"):
        return float(champion.tags[f"test_{metric}"]), "on the same test split"
    # Other data: score the champion on the current test split (the challenger's).
    current = read_manifest(cfg.data.out)["data_hash"]
    if current != challenger.tags.get("data_hash"):
        raise RegistryError(
            f"{cfg.data.out} (data {current[:12]}) is neither the challenger's data nor the "
            "champion's: run the pipeline on the current data before promoting"
        )
    if json.loads(champion.tags.get("classes", "[]")) != json.loads(challenger.tags["classes"]):
        return None, "champion was trained on other classes and cannot be scored on this split"
    with tempfile.TemporaryDirectory(prefix="transferops-champion-") as dl:
        folder = download_model_folder(champion.name, champion.version, dl)
        if folder is None:
            raise RegistryError(
                f"{champion.name} v{champion.version} (the champion) holds no transferops model "
                "folder, so it cannot be re-scored on the new test split: move the alias by hand"
            )
        scored = score_model_dir(folder, cfg)
    return scored[metric], f"re-scored on the new test split (data {current[:12]})"


def evidence(cfg: Config, client: Any) -> Evidence:
    """Look up the challenger and champion (re-scoring the champion when needed)."""
    name, metric = registered_model_name(cfg), cfg.registry.metric
    challenger = _alias(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(
            f"{name} has no @{CHALLENGER} version: run `transferops register` first"
        )
    champion = _alias(client, name, CHAMPION)
    ev = Evidence(
        name=name,
        challenger=str(challenger.version),
        challenger_metric=float(challenger.tags[f"test_{metric}"]),
        scratch_mean=_metric_tag(challenger, f"scratch_{metric}"),
        gain_low=_float_tag(challenger, "transfer_minus_scratch_ci_low"),
        verdict=challenger.tags.get("verdict", "no verdict recorded"),
        candidate=challenger.tags.get("candidate", "finetuned"),
        minus={
            role: tuple(float(challenger.tags[f"minus_{role}_{k}"]) for k in BOUNDS)
            for role in (*CHEAP, "scratch")
            if f"minus_{role}_ci_high" in challenger.tags
        },
        dropped=json.loads(challenger.tags.get("dropped_classes", "[]")),
        champion=str(champion.version) if champion else None,
    )
    if champion is None or champion.version == challenger.version:
        return ev
    value, note = _champion_metric(cfg, champion, challenger)
    return replace(ev, champion_metric=value, champion_note=note)


def decide_promotion(cfg: Config) -> Decision:
    """The promotion decision for the current challenger (changes nothing)."""
    from mlflow import MlflowClient

    setup_tracking(cfg.tracking)
    return gate(evidence(cfg, MlflowClient()), cfg.registry)


def promote(cfg: Config, dry_run: bool = False) -> Decision:
    """Move `champion` to the challenger if both gates pass; `dry_run` only decides."""
    from mlflow import MlflowClient

    d = decide_promotion(cfg)
    if d.promote and not dry_run:
        client = MlflowClient()
        assert d.challenger is not None
        client.set_registered_model_alias(d.name, CHAMPION, d.challenger)
        if d.champion is not None:
            client.set_model_version_tag(d.name, d.challenger, "replaced_champion", d.champion)
        d.applied = True
    log.info("%s%s", "(dry run) " if dry_run else "", d.summary())
    return d
