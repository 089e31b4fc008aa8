"""`transferops` command line: a thin door onto the library (one command per pipeline verb).

Every command takes ``--params params.yaml`` and any number of ``--set key.path=value``
overrides, validated by the same pydantic models as the file. Each command imports its verb's
module when it runs, so `transferops --help` answers without loading Optuna or MLflow.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from transferops.config import (
    Config,
    load_config,
    parse_override,
    read_overrides_file,
    registered_model_name,
)
from transferops.errors import TransferopsError, known_fault
from transferops.runtime import interrupt
from transferops.runtime.lock import project_lock
from transferops.runtime.memory import tensor_sized_malloc
from transferops.runtime.progress import console, hand_logging_to_prefect, setup_logging
from transferops.runtime.redact import has_password, mask

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Transfer-learning pipeline: prepare -> pull -> search -> train -> baseline -> "
    "evaluate -> register -> promote (`run` does them all; `serve` schedules it).",
)
log = logging.getLogger("transferops")


def _show_version(value: bool) -> None:
    if value:
        print(f"transferops {version('transferops')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="also show third-party libraries' lines and bars, and debug"
        ),
    ] = False,
) -> None:
    """Transfer-learning pipeline: prepare -> pull -> search -> train -> baseline -> evaluate
    -> register -> promote (`run` does them all; `serve` schedules it)."""
    tensor_sized_malloc()
    if verbose:  # in the environment, so Dask workers and Prefect's subprocesses see it too
        os.environ["TRANSFEROPS_VERBOSE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0"


ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params file (the one config file)")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override, e.g. --set finetune.lr=3e-4 (repeatable)"),
]

OverridesFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="YAML/JSON of key.path: value applied before --set (e.g. "
        "models/search/best_params.json)"
    ),
]


F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Print user errors (bad params, data, source) as a message and exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except TransferopsError as exc:
            console.print(f"[bold red]error:[/] {mask(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:
            message = known_fault(exc)
            if message is None:
                raise
            console.print(f"[bold red]error:[/] {mask(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _interruptible(fn: F) -> F:
    """Ctrl-C / SIGTERM during the command: clean stop, exit 130 (see interrupt.py)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        interrupt.install(fn.__name__)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:  # the stack has unwound: now clean up, exit 130
            interrupt.finish()

    return wrapper  # type: ignore[return-value]


def _locked(fn: F) -> F:
    """Hold the project folder's lock (one run per folder) while the command runs; it is
    interruptible."""
    inner = _interruptible(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with project_lock(fn.__name__):
            return inner(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _cfg(
    params: Path,
    overrides: list[str] | None,
    extra: dict[str, Any] | None = None,
    overrides_file: Path | None = None,
) -> Config:
    """params.yaml + an overrides file (e.g. search's best params) + --set, validated once."""
    sets: list[str] = []
    if overrides_file is not None:
        sets += [f"{k}={json.dumps(v)}" for k, v in read_overrides_file(overrides_file).items()]
    sets += list(overrides or [])
    sets += [f"{k}={json.dumps(v)}" for k, v in (extra or {}).items() if v is not None]
    cfg = load_config(params, sets)
    interrupt.at_step(interrupt.STATE["step"] or "start", cfg)  # what an interrupt cleans
    return cfg


@app.command()
@_user_errors
@_locked
def prepare(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    limit_per_class: Annotated[
        int | None, typer.Option(help="keep at most N training examples per class")
    ] = None,
    force: Annotated[bool, typer.Option(help="rebuild even when up to date")] = False,
) -> None:
    """Split, decode and hash the dataset into data.out (no-op when unchanged)."""
    from transferops.data.prepare import prepare as _prepare

    cfg = _cfg(params, set_, {"data.limit_per_class": limit_per_class})
    _prepare(cfg, force=force)  # its log line is the result: printed once


@app.command()
@_user_errors
def init(
    path: Annotated[Path, typer.Argument(help="the project folder (created if missing)")] = Path(
        "."
    ),
    data: Annotated[
        Path,
        typer.Option(
            help="your data: an image folder (class folders, optional "
            "train/val/test folders) or a table (CSV, TSV, JSONL)"
        ),
    ] = Path("data"),
    force: Annotated[bool, typer.Option(help="overwrite params.yaml, dvc.yaml, ...")] = False,
    git: Annotated[bool, typer.Option(help="also `git init` the project")] = False,
    dvc: Annotated[bool, typer.Option(help="also `dvc init` it and `dvc add` the data")] = False,
) -> None:
    """Start a project: params.yaml (every key, commented) set for your data, a dvc.yaml
    calling this transferops, .gitignore / .dvcignore. Says what it found in the data."""
    from transferops.pipeline.project import WRITTEN
    from transferops.pipeline.project import init as _init

    data = data if data.is_absolute() else Path.cwd() / data
    found = _init(path, data, force, git, dvc)
    for line in found.said:
        console.print(f"found: {line}", highlight=False)
    for line in found.problems:
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    console.print(f"wrote {', '.join(WRITTEN)} in {path.resolve()}", highlight=False)
    where = "" if path.resolve() == Path.cwd() else f"cd {path} && "
    first = "fix what the warning says, then " if found.problems else ""
    console.print(f"next: {first}{where}transferops run", highlight=False)


@app.command("demo-data")
@_user_errors
@_locked
def demo_data(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Write the built-in demo dataset (data.demo) to data.path (a DVC stage)."""
    from transferops.data.demo import write_demo

    cfg = _cfg(params, set_)
    if not cfg.data.demo:
        raise TransferopsError("data.demo is null: there is no demo dataset to write")
    path = write_demo(cfg.data.demo, cfg.data.path)
    console.print(f"wrote demo {cfg.data.demo!r} to {path}")


@app.command()
@_user_errors
@_locked
def pull(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="re-pull even when up to date")] = False,
) -> None:
    """Fetch the source model into source.out with a checksummed manifest (offline first);
    with source.candidates, rank them on the prepared data first and fetch the best."""
    from transferops.search.sources import pull_best

    cfg = _cfg(params, set_)
    res = pull_best(cfg, force=force)
    state = "up to date" if res.skipped else "written"
    m = res.manifest
    console.print(
        f"{cfg.source.out}: {state}; {m['origin']} ({m['num_blocks']} blocks, "
        f"sha256 {m['sha256'][:12]})"
    )
    if "ranking" in m:
        console.print(f"chosen from source.candidates: {m['ranking']['why']}")


@app.command()
@_user_errors
@_locked
def train(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="resume from the last checkpoint")] = True,
    overrides_file: OverridesFileOpt = None,
) -> None:
    """Staged fine-tuning with the params in finetune.* (writes finetune.out)."""
    from transferops.finetune.train import train_from_config

    cfg = _cfg(params, set_, overrides_file=overrides_file)
    done = train_from_config(cfg, resume=resume)
    how = f"copied from {done.reused_from}" if done.reused_from else f"{done.seconds:.1f}s"
    console.print(
        f"{cfg.finetune.out}: val accuracy {done.val_accuracy:.4f} "
        f"(depth {done.unfreeze_depth}, {done.epochs} epochs, {how})"
    )


@app.command()
@_user_errors
@_interruptible  # not locked: several `transferops search` processes may share one study
def search(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Optuna search over search.space (resumes the same study; writes search.out)."""
    from transferops.search.study import run_search

    cfg = _cfg(params, set_)
    res = run_search(cfg)
    console.print(
        f"study {res.study_name}: best val accuracy {res.best_value:.4f} (trial "
        f"#{res.best_trial}) with {res.best_params}; trials {res.counts}; "
        f"written {res.out}/best_params.json"
    )


@app.command()
@_user_errors
@_locked
def baseline(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    overrides_file: OverridesFileOpt = None,
) -> None:
    """Train transfer / from-scratch / probe runs over baseline.seeds (+ few-shot curve)."""
    from transferops.evaluation.baseline import run_baselines

    cfg = _cfg(params, set_, overrides_file=overrides_file)
    runs = run_baselines(cfg)
    for r in runs:
        console.print(f"{r['name']}: val accuracy {r['val_accuracy']:.4f}")


@app.command()
@_user_errors
@_locked
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Score every baseline run on the test split; write evaluate.out (report, metrics, plots)."""
    from transferops.evaluation.evaluate import evaluate as _evaluate

    cfg = _cfg(params, set_)
    m = _evaluate(cfg)
    console.print(f"[bold]{m['verdict']}[/]; report: {cfg.evaluate.out}/evaluation.md")


@app.command()
@_user_errors
@_locked
def adapt(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Adapt finetune.out to data.unlabelled (no labels needed): AdaBN, CORAL, instance
    weights, pseudo-labels (adapt.methods); scored on data.target_test when given; a kept
    model is registered with alias `adapted`."""
    from transferops.pipeline.run import step_adapt

    cfg = _cfg(params, set_)
    r = step_adapt(cfg)  # adapt, and register the adapted model (alias adapted) if kept
    console.print(f"{r['decision']}; report: {cfg.adapt.report}")
    if r["kept"]:
        console.print(f"adapted model: {cfg.adapt.out}")


@app.command()
@_user_errors
@_locked
def register(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Register finetune.out in MLflow with its lineage; alias it `challenger`."""
    from transferops.registry.register import register as _register

    cfg = _cfg(params, set_)
    res = _register(cfg)
    state = "registered" if res.created else "already registered"
    console.print(f"{res.name} v{res.version}: {state}; alias challenger")


@app.command()
@_user_errors
def promote(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option(help="show the decision, change nothing")] = False,
) -> None:
    """Move alias `champion` to the challenger if it beats the baseline and the champion."""
    from transferops.registry.promote import promote as _promote

    cfg = _cfg(params, set_)
    with contextlib.nullcontext() if dry_run else project_lock("promote"):
        _promote(cfg, dry_run=dry_run)  # its log line is the decision: printed once


@app.command()
@_user_errors
@_locked
def export(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Export the registered model as ONNX (probabilities out), checked against PyTorch on
    the test split; logged to its model version (writes export.out)."""
    from transferops.registry.export import export as _export

    cfg = _cfg(params, set_)
    r = _export(cfg)
    console.print(
        f"{r['model_name']} v{r['version']}: {cfg.export.out}/model.onnx (opset "
        f"{r['onnx_opset']}, sha256 {r['onnx_sha256'][:12]}); ONNX Runtime vs PyTorch on "
        f"{r['parity_examples']} test examples: max |dp| {r['onnx_parity_max_abs']:.1e}, "
        f"labels agree {r['label_agreement']:.1%}"
    )


@app.command("predict")
@_user_errors
def predict_cmd(
    paths: Annotated[
        list[Path], typer.Argument(help="images, folders of images, or CSV/text files of texts")
    ],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="models:/<name>@<alias> or models:/<name>/<version> (default: the champion)"
        ),
    ] = None,
    column: Annotated[str, typer.Option(help="the text column of a CSV")] = "text",
    out: Annotated[
        Path | None,
        typer.Option(help="write every prediction (and per-class probabilities) as CSV"),
    ] = None,
) -> None:
    """Predict with a registered model, from any folder (the project's store is found
    through --params)."""
    from transferops.registry.predict_registered import predict_registered

    cfg = _cfg(params, set_)
    uri = model or f"models:/{registered_model_name(cfg)}@champion"
    df = predict_registered(cfg, params.resolve().parent, uri, paths, column)
    if out is not None:
        df.to_csv(out, index=False)
    console.print(
        f"{df.attrs['model']} ({uri}): {len(df)} prediction(s)"
        + (f", {df.attrs['skipped']} input(s) skipped" if df.attrs["skipped"] else "")
        + (f", written to {out}" if out else "")
    )
    for row in df.head(50).itertuples():  # one line per input, whatever its name holds
        name = row.input.translate({10: "\\n", 13: "\\r", 9: "\\t"})
        typer.echo(f"{row.label}\t{row.confidence:.3f}\t{name}")
    if len(df) > 50:
        console.print(f"... {len(df) - 50} more" + ("" if out else "; use --out FILE for all"))


def _overrides_map(
    overrides: list[str] | None, overrides_file: Path | None = None
) -> dict[str, Any]:
    """--overrides-file and --set as one mapping of dotted keys (what the flow takes). A URL
    with a password is handed over as a ``${TRANSFEROPS_SECRET_<n>}`` placeholder set in this
    process's environment (which the flow run inherits): Prefect stores flow-run parameters
    in its database and shows them in its UI."""
    out = dict(read_overrides_file(overrides_file)) if overrides_file else {}
    for text in overrides or []:
        parts, value = parse_override(text)
        out[".".join(parts)] = value
    for i, (key, value) in enumerate(sorted(out.items())):
        if isinstance(value, str) and has_password(value):
            os.environ[f"TRANSFEROPS_SECRET_{i}"] = value
            out[key] = f"${{TRANSFEROPS_SECRET_{i}}}"
    return out


def _flow_module() -> ModuleType:
    """The package's Prefect flow module (:mod:`transferops.pipeline.flow`): an installed
    transferops runs, serves and deploys it from any folder."""
    return importlib.import_module("transferops.pipeline.flow")


@app.command()
@_user_errors
@_locked
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    prefect: Annotated[
        bool,
        typer.Option(
            help="run as the Prefect flow (ephemeral: no server needed); --no-prefect calls "
            "the same steps directly"
        ),
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the summary as JSON (for scripts)")
    ] = False,
    preset: Annotated[
        str | None,
        typer.Option(
            help="fast | balanced | best: a budget (search trials, seeds, curve, source "
            "ranking) over params.yaml's values; `preset:` in params.yaml makes it stick"
        ),
    ] = None,
) -> None:
    """The whole pipeline: prepare -> pull -> drift -> search -> train -> baseline ->
    evaluate -> register -> promote -> export. Unchanged steps are skipped."""
    from transferops.pipeline.run import run_pipeline

    set_ = [*(set_ or []), *([f"preset={preset}"] if preset else [])]
    cfg = _cfg(params, set_)  # validate before Prefect starts
    log.info(
        "transferops run: %s is valid; %s",
        params,
        "starting Prefect's temporary server" if prefect else "running the steps",
    )
    if prefect:
        from transferops.runtime.services import check_services

        check_services(cfg)  # and reach the services: a bad URL fails before Prefect starts
        flows = _flow_module()
        hand_logging_to_prefect()
        interrupt.install("run", in_handler=True)  # Prefect would report to a dying server
        try:
            summary = flows.transfer_pipeline(
                params_file=str(params), overrides=_overrides_map(set_)
            )
        except RuntimeError as exc:
            if "ephemeral Prefect API server" not in str(exc):
                raise
            # Nothing ran yet: the same steps without Prefect lose only its run record
            setup_logging()  # Prefect's handlers had taken the transferops lines: take them back
            log.warning(
                "Prefect's temporary API server did not start in time (a busy machine?): "
                "running the same steps without Prefect. To keep Prefect, raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (e.g. 120) or start a server "
                "(prefect server start) and set PREFECT_API_URL"
            )
            summary = run_pipeline(cfg)
    else:
        summary = run_pipeline(cfg)
    # The result goes to stdout (the logs are on stderr): `transferops run --json > s.json`.
    typer.echo(json.dumps(summary, indent=2) if as_json else human_summary(summary))


def human_summary(s: dict[str, Any]) -> str:
    """The run's summary as a person reads it (``--json`` gives every field)."""
    from transferops.pipeline.run import cautions  # heavy: imported by the run already

    data = (
        f"{s['counts']['train']} train / {s['counts']['val']} val / "
        f"{s['counts']['test']} test (data {s['data_hash'][:12]})"
    )
    if "test_accuracy" not in s:  # schedule.retrain decided there was nothing to retrain
        rows = [("data", data), ("source", s["source"]), ("retrain", s["retrain"])]
        rows += [("adapted", s["adapted"])] if s.get("adapted") else []
        return "\n".join(f"{k:>14}  {v}" for k, v in rows)
    acc = s["test_accuracy"]
    trials = ", ".join(f"{v} {k}" for k, v in s["trials"].items() if v)
    best = ", ".join(f"{k.split('.')[-1]} {v:.4g}" for k, v in s["best_params"].items())
    order = ["finetuned", *(k for k in acc if k != "finetuned")]  # the registered model first
    kind = s.get("candidate", "finetuned")
    members = (s.get("members") or []) if kind == "ensemble" else []
    kind += f" of {len(members)}" if members else ""
    registered = "registered model" + (f" ({kind})" if kind != "finetuned" else "")
    scores = " | ".join(
        f"{registered if k == 'finetuned' else k} {acc[k]:.3f}"
        for k in order
        if acc.get(k) is not None
    )
    rows = [
        ("data", data),
        ("source", s["source"]),
        ("search", f"{trials}; best {best} (val {s['best_value']:.4f})"),
        ("test accuracy", scores),
        *([("members", "; ".join(members))] if members else []),
        *(
            [("dropped", f"class {', '.join(s['dropped_classes'])}: recall 0 on test")]
            if s.get("dropped_classes")
            else []
        ),
        *(("caution", caution) for caution in cautions(s)),
        ("verdict", s["verdict"]),
        (
            "registered",
            s["registered"]
            + (f", champion v{s['champion']}" if s["champion"] else ", not champion"),
        ),
        ("promotion", s["promotion"]),
        ("report", s["report"]),
        *([("onnx", s["onnx"])] if s.get("onnx") else []),
        *([("adapted", s["adapted"])] if s.get("adapted") else []),
    ]
    return "\n".join(f"{k:>14}  {v}" for k, v in rows)


@app.command()
@_user_errors
def ui(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    mlflow_port: Annotated[int, typer.Option(help="MLflow UI port")] = 5000,
    optuna_port: Annotated[int, typer.Option(help="optuna-dashboard port")] = 8080,
) -> None:
    """Open the project's MLflow UI and optuna-dashboard on 127.0.0.1 (Ctrl-C stops them)."""
    from transferops.pipeline import ui as _ui
    from transferops.runtime.tracking import is_server

    cfg = _cfg(params, set_)
    svcs = _ui.services(cfg, params.resolve().parent, mlflow_port, optuna_port)
    with _ui.running(svcs):
        if is_server(cfg.tracking.uri):
            console.print(f"MLflow: {mask(cfg.tracking.uri)} (the configured server)")
        for s in svcs:
            console.print(f"{s.name}: {s.url}")
        console.print("Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


@app.command()
@_user_errors
def serve(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "transferops",
) -> None:
    """Serve the flow as a Prefect deployment from this process, on schedule.cron when
    schedule.enabled (one machine; `deploy` for a work pool).

    Needs a Prefect API (e.g. `prefect server start`, then PREFECT_API_URL); trigger a run
    with `prefect deployment run transfer-pipeline/<name>`. Ctrl-C stops serving.
    """
    from transferops.pipeline import deployment

    cfg = _cfg(params, set_)
    flows = _flow_module()
    console.print(f"serving deployment transfer-pipeline/{name}: {deployment.describe(cfg)}")
    flows.transfer_pipeline.serve(
        name=name,
        schedules=deployment.schedules(cfg),
        parameters=deployment.flow_parameters(params, _overrides_map(set_)),
        tags=["transferops"],
    )


@app.command()
@_user_errors
def deploy(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    name: Annotated[str, typer.Option(help="deployment name")] = "transferops",
    pool: Annotated[str, typer.Option(help="process work pool (created if missing)")] = (
        "transferops"
    ),
) -> None:
    """Create or update the deployment on a Prefect process work pool, on schedule.cron
    when schedule.enabled; `prefect worker start --pool <pool>` runs it (any machine that
    sees this folder at the same path).

    Needs a Prefect server (PREFECT_API_URL).
    """
    from transferops.pipeline import deployment

    cfg = _cfg(params, set_)
    flows = _flow_module()
    deployment_id = deployment.deploy(cfg, flows, name, pool, params, _overrides_map(set_))
    console.print(
        f"deployment transfer-pipeline/{name} ({deployment_id}) on work pool {pool!r}: "
        f"{deployment.describe(cfg)}\n"
        f"start a worker:  prefect worker start --pool {pool}\n"
        f"run it now:      prefect deployment run transfer-pipeline/{name}"
    )


THREADS_JOIN_S = 30.0  # how long the exit waits for worker threads still running


def _join_threads(timeout: float) -> list[str]:
    """What the interpreter does first at exit, with a bound: the threading exit hooks (they
    wake idle ``concurrent.futures`` workers, such as MLflow's artifact uploaders, which end
    only through them), then every non-daemon thread joined. Returns the names of threads
    still running after `timeout` seconds."""

    def run_hooks() -> None:
        for hook in reversed(getattr(threading, "_threading_atexits", [])):
            with contextlib.suppress(Exception):
                hook()

    deadline = time.monotonic() + timeout
    # the hooks join the executors' workers themselves: in a daemon thread, so the bound holds
    hooks = threading.Thread(target=run_hooks, name="threading-exit-hooks", daemon=True)
    hooks.start()
    hooks.join(timeout)
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    return [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]


def entry() -> NoReturn:
    """The ``transferops`` command: the app, then a quick exit. Every exit handler runs
    (Prefect's temporary server stops, MLflow and the logs flush) and every worker thread is
    joined (at most `THREADS_JOIN_S`: a thread that never ends is named, not waited for
    forever), as at any exit; then the process ends without the interpreter's teardown of
    torch, MLflow, Prefect and their tensors, which writes nothing and took 2.4 s of every
    command (10 of them in a `dvc repro`)."""
    try:
        app()
        code: int | str | None = 0
    except SystemExit as exc:
        code = exc.code
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: the ordinary exit
        sys.exit(code)
    if isinstance(code, str):  # what sys.exit("message") does
        print(code, file=sys.stderr)
        code = 1
    left = _join_threads(THREADS_JOIN_S)
    if left:
        print(
            f"warning: exiting with {len(left)} thread(s) still running after "
            f"{THREADS_JOIN_S:.0f} s: {', '.join(left)}",
            file=sys.stderr,
        )
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    entry()
