"""The whole pipeline, in one place: the steps, their order, and when a step can be skipped.

prepare -> pull -> search -> train -> baseline -> evaluate -> register -> promote -> export.
Each step is the same library function the CLI verbs and DVC stages call, wrapped to return
a small JSON-able result. :func:`run_pipeline` chains them; *how* a step runs is the
caller's choice (a :data:`StepRunner`): :func:`run_locally` (the Python door) or a Prefect
task (:mod:`transferops.pipeline.flow`, what ``transferops run`` uses).

Skipping unchanged work. The expensive steps (search, train, baseline, evaluate) get a
*fingerprint*: a hash of the params they read and of their upstream results (the data hash,
the source sha256, the best params, the trained model's sha256...). After a step runs, a
stamp ``.transferops/steps/<step>.json`` records its fingerprint, its result and the hash of
its marker output file. A step is *current* when its stamp has the same fingerprint and the
marker file is unchanged (so outputs rewritten by another door, or deleted, are redone).
Prefect keys its task cache on the same fingerprint and refreshes it when the step is not
current. prepare and pull skip themselves (their own up-to-date checks), register is
idempotent, and promote always re-decides (the registry may have changed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferops.adapt.adapt import adapt
from transferops.config import STEP_INPUTS, Config, step_params, with_overrides
from transferops.data.prepare import prepare
from transferops.evaluation.baseline import run_baselines
from transferops.evaluation.drift import decide_retrain, save_reference
from transferops.evaluation.evaluate import evaluate
from transferops.evaluation.report import recipe_below
from transferops.finetune.train import member_label, train_from_config
from transferops.model.folder import SPEC_FILE, WEIGHTS_FILE
from transferops.pipeline.dvc_lock import record_run
from transferops.registry.adapted import register_adapted
from transferops.registry.export import export
from transferops.registry.lineage import git_commit
from transferops.registry.promote import promote
from transferops.registry.register import register
from transferops.runtime import interrupt
from transferops.runtime.artifacts import read_json, sha256_file, sha256_json, write_json_atomic
from transferops.runtime.lock import project_lock
from transferops.runtime.memory import tensor_sized_malloc
from transferops.runtime.services import check_services
from transferops.runtime.tracking import close_runs, log_dataset, log_run_params, pipeline_run
from transferops.search.sources import pull_best
from transferops.search.study import run_search
from transferops.sources.manifest import source_id

log = logging.getLogger(__name__)

STEPS = (  # the order a run goes through (reference, after a promotion, is unnumbered)
    "prepare",
    "pull",
    "drift",
    "search",
    "train",
    "baseline",
    "evaluate",
    "register",
    "promote",
    "adapt",
    "export",
)
STAMPS = Path(".transferops") / "steps"

StepFn = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class StepKey:
    """Cache identity of a skippable step."""

    fingerprint: str
    current: bool  # its outputs on disk match the fingerprint (a cached result is valid)


# run_step(step name, key (None: never skipped), the step) -> the step's result
StepRunner = Callable[[str, StepKey | None, StepFn], dict[str, Any]]


# ----------------------------------------------------------------- the steps


def step_prepare(cfg: Config) -> dict[str, Any]:
    """Split, decode, hash (no-op when up to date)."""

    res = prepare(cfg)
    return {"data_hash": res.data_hash, "counts": res.counts, "skipped": res.skipped}


def step_pull(cfg: Config) -> dict[str, Any]:
    """Fetch the source model (no-op when up to date); rank source.candidates first."""

    res = pull_best(cfg)
    return {
        "origin": res.manifest["origin"],
        "sha256": res.manifest["sha256"],
        "source_id": source_id(res.manifest),  # + the input size the model resizes to
        "skipped": res.skipped,
        **({"chosen": res.manifest["ranking"]["why"]} if "ranking" in res.manifest else {}),
    }


def step_search(cfg: Config) -> dict[str, Any]:
    """The Optuna study (resumes; the test split is never read)."""

    res = run_search(cfg)
    summary = read_json(res.out / "summary.json")
    return {
        "study": res.study_name,
        "best_params": res.best_params,
        "best_value": res.best_value,
        "best_trial": res.best_trial,
        "runners_up": summary.get("runners_up", []),  # their models join train's ensemble
        "trials": {k: v for k, v in res.counts.items() if v},
        "mlflow_run_id": summary["mlflow_run_id"],
    }


def step_train(cfg: Config) -> dict[str, Any]:
    """Fine-tune with the best params (cfg already carries them)."""

    done = train_from_config(cfg)
    spec = read_json(Path(cfg.finetune.out) / SPEC_FILE)
    return {
        "model": str(cfg.finetune.out),
        # an ensemble's members in words (seeds, the search's runners-up that joined)
        "members": [member_label(m) for m in spec.get("members") or []],
        "model_sha256": sha256_file(Path(cfg.finetune.out) / WEIGHTS_FILE),
        "unfreeze_depth": done.unfreeze_depth,
        "val_accuracy": round(done.val_accuracy, 4),
        "epochs": done.epochs,
        "train_seconds": round(done.seconds, 1),
        "reused_from": done.reused_from,
        "candidate": done.candidate,
    }


def step_baseline(cfg: Config) -> dict[str, Any]:
    """Transfer / scratch / probe over seeds, and the few-shot curve."""

    runs = run_baselines(cfg)
    return {
        "runs": len(runs),
        "index_sha256": sha256_file(cfg.baseline.index),
    }


def step_evaluate(cfg: Config) -> dict[str, Any]:
    """The test split: every model, the verdict, the report."""

    report = evaluate(cfg)
    test_acc = {
        role: m["accuracy"]["mean"] if isinstance(m["accuracy"], dict) else m["accuracy"]
        for role, m in report["models"].items()
    }
    if "finetuned" in report:
        test_acc["finetuned"] = report["finetuned"]["accuracy"]
    below = {  # transfer − each baseline fine-tuning is significantly below, in points
        other: [round(100 * d[k], 1) for k in ("mean", "ci_low", "ci_high")]
        for other, d in recipe_below(report).items()
    }
    return {
        "test_accuracy": {k: round(v, 4) for k, v in test_acc.items()},
        "verdict": report["verdict"],
        "transfer_beats_scratch": report["transfer_beats_scratch"],
        "report": str(Path(cfg.evaluate.out) / "evaluation.md"),
        "dropped_classes": report.get("finetuned", {}).get("dropped_classes", []),
        "recipe_below": below,
    }


def step_register(cfg: Config) -> dict[str, Any]:
    """A model version with lineage, alias challenger (idempotent)."""

    res = register(cfg)
    return {
        "model_name": res.name,
        "version": res.version,
        "created": res.created,
        "mlflow_run_id": res.run_id,
    }


def step_promote(cfg: Config) -> dict[str, Any]:
    """Move champion to the challenger when both gates pass."""

    d = promote(cfg)
    return {
        "promoted": d.applied,
        "champion": d.challenger if d.applied else d.champion,
        "decision": d.summary(),
    }


def step_export(cfg: Config) -> dict[str, Any]:
    """The registered model as ONNX, checked against PyTorch, on its model version."""

    receipt = export(cfg)
    return {
        "onnx": str(Path(cfg.export.out) / "model.onnx"),
        "onnx_sha256": receipt["onnx_sha256"],
        "parity_max_abs": receipt["onnx_parity_max_abs"],
    }


def step_drift(cfg: Config) -> dict[str, Any]:
    """Whether to retrain (schedule.retrain): new data, drift from the champion's data."""

    return decide_retrain(cfg)


def step_adapt(cfg: Config) -> dict[str, Any]:
    """The trained model adapted to data.unlabelled (kept only if not worse on the labelled
    target sample)."""

    r = adapt(cfg)
    registered = register_adapted(cfg) if r.get("register") else None
    if registered is not None:
        r["decision"] += f"; registered {registered.name} v{registered.version} (@adapted)"
    return {k: r.get(k) for k in ("decision", "kept", "methods", "target_accuracy")}


def step_reference(cfg: Config) -> dict[str, Any]:
    """The new champion's data becomes the reference the next drift check compares with."""

    return {"reference": str(save_reference(cfg))}


# --------------------------------------------------- fingerprints and stamps


def _marker(step: str, cfg: Config) -> Path:
    """The output file whose change means a step's output was rewritten or removed."""

    return {
        "search": Path(cfg.search.out) / "best_params.json",
        "train": Path(cfg.finetune.out) / WEIGHTS_FILE,
        "baseline": cfg.baseline.index,
        "evaluate": Path(cfg.evaluate.out) / "metrics.json",
        "adapt": Path(cfg.adapt.report),
        "export": Path(cfg.export.out) / "export.json",
    }[step]


def fingerprint(step: str, cfg: Config, upstream: dict[str, Any]) -> str:
    """Hash of what a step's output depends on: the params and paths it reads (declared once,
    in :data:`transferops.config.STEP_INPUTS`, like dvc.yaml's stage) and upstream results."""
    assert step in STEP_INPUTS, step
    return sha256_json({"step": step, "params": step_params(cfg, step), "upstream": upstream})


def stamp_path(step: str) -> Path:
    """Where a step's stamp lives (relative to the working directory, like all outputs)."""
    return STAMPS / f"{step}.json"


def current_result(step: str, cfg: Config, fp: str) -> dict[str, Any] | None:
    """The recorded result if `step` already ran with fingerprint `fp` and its output is
    unchanged on disk; else None."""
    path, marker = stamp_path(step), _marker(step, cfg)
    if not (path.exists() and marker.exists()):
        return None
    stamp = read_json(path)
    if stamp.get("fingerprint") != fp or stamp.get("marker_sha256") != sha256_file(marker):
        return None
    return stamp["result"]


def record(step: str, cfg: Config, fp: str, result: dict[str, Any]) -> None:
    """Stamp a finished step (see :func:`current_result`)."""
    marker = _marker(step, cfg)
    write_json_atomic(
        stamp_path(step),
        {
            "fingerprint": fp,
            "marker": str(marker),
            "marker_sha256": sha256_file(marker),
            "result": result,
        },
    )


def run_locally(step: str, key: StepKey | None, fn: StepFn) -> dict[str, Any]:
    """The plain-Python runner: run the step (skipping is decided by `run_pipeline`)."""
    return fn()


def announce(step: str, started: float) -> None:
    """One line per step: where the run is (k of n) and how long it has taken so far."""
    k = STEPS.index(step) + 1 if step in STEPS else None
    where = f"{k}/{len(STEPS)} " if k else ""
    elapsed = int(time.monotonic() - started)
    log.info("step %s%s (%d:%02d elapsed)", where, step, elapsed // 60, elapsed % 60)


# ------------------------------------------------------------------ pipeline


def run_pipeline(cfg: Config, run_step: StepRunner = run_locally) -> dict[str, Any]:
    """prepare -> pull -> search -> train -> baseline -> evaluate -> register -> promote
    -> export (when export.onnx).

    Returns a summary. Steps whose fingerprint and outputs are unchanged are not redone. Holds
    the project folder's lock throughout: a second run in the folder is refused at once.
    """
    tensor_sized_malloc()  # the Python door and Prefect's workers start here, not in the CLI
    with project_lock("run"):
        check_services(cfg)  # an unreachable server or bad storage URL: one line, now
        close_runs(cfg.tracking)  # MLflow runs a killed earlier run left RUNNING

        started = time.monotonic()

        def step_runner(step: str, key: StepKey | None, fn: StepFn) -> dict[str, Any]:
            interrupt.at_step(step, cfg)  # what an interrupt message names
            announce(step, started)
            return run_step(step, key, fn)

        commit, dirty = git_commit()
        tags = {"git_commit": commit, "git_dirty": str(dirty).lower()}
        with pipeline_run(cfg.tracking, tags) as (client, run_id):
            summary = _run_steps(cfg, step_runner)
            _record_outcome(client, run_id, cfg, summary)
        if "registered" in summary:  # a whole run (not one stopped at the drift gate)
            record_run(cfg, [s for s in STEPS if s != "export" or cfg.export.onnx])
        return summary


TAG_CHARS = 500  # a tag longer than this is cut in MLflow's runs table: the full text is a file


def _record_outcome(client: Any, run_id: str, cfg: Config, summary: dict[str, Any]) -> None:
    """The invocation's parent run carries what it ran with and what came out: every param,
    the prepared data as its dataset, the verdict and the registry outcome (tags, and a
    description linking the registered version), the full promotion decision
    (``promotion.md``), the report, and the retrain decision with its drift test."""
    log_run_params(client, run_id, cfg.model_dump(mode="json"))
    if summary.get("data_hash"):
        name = Path(cfg.data.path).name
        log_dataset(client, run_id, cfg.data.out, name, summary["data_hash"], "pipeline")
    for k in ("verdict", "registered", "data_hash", "source", "promotion", "champion", "retrain"):
        if k in summary:
            text = str(summary[k])
            cut = len(text) > TAG_CHARS
            client.set_tag(
                run_id, k, text[: TAG_CHARS - 30] + " ... (in full: summary.json)" if cut else text
            )
    if "promotion" in summary:
        client.log_text(run_id, f"# Promotion decision\n\n{summary['promotion']}\n", "promotion.md")
    client.set_tag(run_id, "mlflow.note.content", run_description(summary))
    for name, value in summary.get("test_accuracy", {}).items():
        if value is not None:
            client.log_metric(run_id, f"test_accuracy_{name}", value)
    drift = summary.get("drift")
    if drift:
        client.log_metric(run_id, "drift_mmd2", drift["mmd2"])
        client.log_metric(run_id, "drift_p_value", drift["p_value"])
    client.log_dict(run_id, summary, "summary.json")
    html = Path(cfg.evaluate.out) / "evaluation.html"
    if html.exists():
        client.log_artifact(run_id, str(html))


def cautions(summary: dict[str, Any]) -> list[str]:
    """What a run's summary warns of: fine-tuning significantly below a baseline on test
    (``recipe_below``: transfer minus it, in points, with its interval)."""
    return [
        f"fine-tuning {m:+.1f} [{lo:+.1f}, {hi:+.1f}] points against the {other} on test: "
        "significantly below it (val chose fine-tuning; see the report)"
        for other, (m, lo, hi) in (summary.get("recipe_below") or {}).items()
    ]


def run_description(summary: dict[str, Any]) -> str:
    """The pipeline run's description (markdown in the MLflow UI): the registered version as
    a link into the registry, its promotion decision in full, the verdict."""
    lines = []
    reg = summary.get("registered")
    if reg:
        name, _, version = reg.rpartition(" v")
        lines.append(f"Registered: [{name} version {version}](#/models/{name}/versions/{version})")
    if summary.get("promotion"):
        lines += ["", f"Promotion: {summary['promotion']}"]
    if summary.get("verdict"):
        lines += ["", f"Verdict: {summary['verdict']}"]
    for caution in cautions(summary):
        lines += ["", f"Caution: {caution}"]
    if summary.get("retrain"):
        lines += ["", f"Retrain: {summary['retrain']}"]
    return "\n".join(lines) or "A pipeline run that stopped before registering a model."


def _run_steps(cfg: Config, run_step: StepRunner) -> dict[str, Any]:

    def cached(step: str, c: Config, upstream: dict[str, Any], fn: Callable) -> dict[str, Any]:
        fp = fingerprint(step, c, upstream)
        hit = current_result(step, c, fp)

        def body() -> dict[str, Any]:
            if hit is not None:
                log.info("step %s: up to date (fingerprint %s), not redone", step, fp[:12])
                return hit
            result = fn(c)
            record(step, c, fp, result)
            return result

        return run_step(step, StepKey(fp, hit is not None), body)

    prep = run_step("prepare", None, lambda: step_prepare(cfg))
    src = run_step("pull", None, lambda: step_pull(cfg))
    data = {
        "data_hash": prep["data_hash"],
        "counts": prep["counts"],
        "source": src["origin"],
        "source_sha256": src["sha256"],
    }
    gate = run_step("drift", None, lambda: step_drift(cfg))
    if not gate["retrain"]:
        log.info("not retraining: %s", gate["reason"])
        adapted = run_step("adapt", None, lambda: step_adapt(cfg)) if gate.get("adapt") else None
        return data | {
            "retrain": f"skipped: {gate['reason']}",
            "drift": gate["drift"],
            **({"adapted": adapted["decision"]} if adapted else {}),
        }
    up = {"data_hash": prep["data_hash"], "source": src["source_id"]}
    found = cached("search", cfg, up, step_search)
    best = with_overrides(cfg, found["best_params"])
    # the search's next-best trials are ensemble members: another set, another model
    trained = cached("train", best, up | {"runners_up": found.get("runners_up")}, step_train)
    baselines = cached(
        "baseline", best, up | {"model_sha256": trained["model_sha256"]}, step_baseline
    )
    evaluated = cached(
        "evaluate",
        best,
        up | {"model_sha256": trained["model_sha256"], "index": baselines["index_sha256"]},
        step_evaluate,
    )
    registered = run_step("register", None, lambda: step_register(best))
    promoted = run_step("promote", None, lambda: step_promote(best))
    if promoted["promoted"]:  # the next drift check compares with this champion's data
        run_step("reference", None, lambda: step_reference(best))
    # seconds, no labels; without data.unlabelled a no-op that writes its report (dvc.lock
    # records every stage a whole run ran, so `dvc status` stays clean)
    adapted = cached("adapt", best, {"model_sha256": trained["model_sha256"]}, step_adapt)
    if best.data.unlabelled is None:
        adapted = None  # not worth a line of the summary
    exported = None
    if cfg.export.onnx:
        version = {"model_sha256": trained["model_sha256"], "version": registered["version"]}
        exported = cached("export", best, version, step_export)
    return data | {
        "retrain": gate["reason"],
        "drift": gate["drift"],
        "study": found["study"],
        "best_params": found["best_params"],
        "best_value": found["best_value"],  # the search's; val_accuracy is the candidate's
        "trials": found["trials"],
        **{k: trained[k] for k in ("unfreeze_depth", "val_accuracy", "epochs", "model")},
        "candidate": trained.get("candidate", "finetuned"),  # cached steps may predate it
        "members": trained.get("members", []),
        **{k: evaluated[k] for k in ("test_accuracy", "verdict", "report")},
        "dropped_classes": evaluated.get("dropped_classes", []),
        "recipe_below": evaluated.get("recipe_below", {}),  # cached steps may predate it
        "registered": f"{registered['model_name']} v{registered['version']}",
        "champion": promoted["champion"],
        "promotion": promoted["decision"],
        "onnx": exported and exported["onnx"],
        **({"adapted": adapted["decision"]} if adapted else {}),
    }
