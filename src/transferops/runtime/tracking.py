"""MLflow set-up, in one place: embedded sqlite by default, a server URI when configured."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import socket
import sqlite3
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferops.config import TrackingConfig
from transferops.errors import ConfigError
from transferops.runtime.critical import critical
from transferops.runtime.progress import quiet, verbose
from transferops.runtime.redact import expand_env, mask

log = logging.getLogger(__name__)


def absolute_uri(uri: str, base: Path | str = ".") -> str:
    """`sqlite:///mlflow.db` relative to `base` (the working directory) -> an absolute
    sqlite URI.

    MLflow caches its store per URI string, so a relative one would keep pointing at the
    first directory it was opened in after a chdir (tests, a Prefect worker).
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(base) / uri[len(prefix) :]).resolve())
    return uri


def is_server(uri: str) -> bool:
    """Whether a tracking URI names an MLflow server (else a local store: sqlite, a folder)."""
    return uri.startswith(("http://", "https://"))


TIMEOUT_S = 5.0
_reachable: set[str] = set()  # server URIs already answered in this process


def check_reachable(key: str, uri: str) -> None:
    """An MLflow server at `uri` answers ``GET /health`` within seconds, and a sqlite store
    is readable (:func:`check_sqlite`); other URIs pass. Else one :class:`ConfigError` line,
    where the client would retry for minutes or print a long traceback."""
    if uri in _reachable:
        return
    if not is_server(uri):
        check_sqlite(key, uri)
        _reachable.add(uri)
        return
    url, login = _split_login(expand_env(uri, key))
    req = urllib.request.Request(url.rstrip("/") + "/health")
    if login is not None:  # HTTP basic auth, as MLflow's client sends it
        token = ":".join(login).encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(token).decode())
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            r.read()
    except OSError as exc:  # URLError, HTTPError, timeouts, refused connections
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"{key} {mask(uri)} is not reachable ({mask(str(reason))}): start the MLflow "
            f"server (mlflow server --host 127.0.0.1 --port ...) or fix {key}"
        ) from None
    _reachable.add(uri)


QUICK_CHECK_MAX = 256 * 2**20  # bytes of a sqlite store checked page by page at start


def check_sqlite(key: str, uri: str) -> None:
    """An existing sqlite store at `uri` opens and passes SQLite's quick check (milliseconds
    for a store of a few MB; the schema only past QUICK_CHECK_MAX); a missing one passes
    (MLflow creates it)."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return
    # quick_check reads every page: past QUICK_CHECK_MAX only the schema is read (a damaged
    # header or schema still shows; a damaged page then surfaces as known_fault's one line)
    check = (
        "PRAGMA quick_check(1)"
        if db.stat().st_size <= QUICK_CHECK_MAX
        else ("SELECT 'ok' FROM sqlite_master LIMIT 1")
    )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            row = con.execute(check).fetchone()
            verdict = row[0] if row else "ok"
    except sqlite3.DatabaseError as exc:
        verdict = str(exc)
    if verdict != "ok":
        raise ConfigError(
            f"{key}: the store {db} is damaged ({verdict}): restore it from a backup, or move "
            f"it aside (mv {db} {db}.damaged) to start an empty one (its runs and registered "
            "models are then no longer found)"
        )


def client_uri(uri: str, key: str) -> str:
    """The URI to hand MLflow: ``${NAME}`` expanded, and credentials moved out of it into
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (MLflow's basic auth), because MLflow
    prints its tracking URI in "View run ... at: <uri>" lines."""
    if not verbose():  # a tqdm bar per download
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = expand_env(uri, key)
    if not is_server(uri):
        return uri
    url, login = _split_login(uri)
    if login is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = login
    return url


def _split_login(url: str) -> tuple[str, tuple[str, str] | None]:
    """`url` without its ``user:password@``, and (user, password) if it had them."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    login = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), login


def setup_tracking(cfg: TrackingConfig) -> Any:
    """Point MLflow at `cfg.uri` and select (creating if needed) the experiment.

    Returns the mlflow module, so callers import it only through here.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    check_reachable("tracking.uri", cfg.uri)
    # "Creating initial MLflow database tables..." on every new store: noise, not news
    quiet("mlflow.store.db.utils")
    import mlflow

    mlflow.set_tracking_uri(absolute_uri(client_uri(cfg.uri, "tracking.uri")))
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        mlflow.create_experiment(
            cfg.experiment, artifact_location=_artifact_location(cfg), tags=EXPERIMENT_TAGS
        )
    elif KIND not in exp.tags:  # made by an older version: the UI would open its GenAI view
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, KIND, EXPERIMENT_TAGS[KIND])
    mlflow.set_experiment(cfg.experiment)
    return mlflow


KIND = "mlflow.experimentKind"
# The MLflow UI opens a model-training experiment on its runs (not the GenAI overview), and
# shows the description on the experiment's page.
EXPERIMENT_TAGS = {
    KIND: "custom_model_development",
    "mlflow.note.content": "transferops: one `pipeline` run per invocation, every step's runs "
    "nested under it (search and its trials, baselines by `role`, evaluation, registration).",
}


PID_TAG, HOST_TAG = "transferops.pid", "transferops.host"


PIPELINE: dict[str, str | None] = {"run_id": None}  # the invocation's parent run, if any


def owner_tags() -> dict[str, str]:
    """Which process owns a run: a run its process left RUNNING (killed) can be found and
    closed (:func:`close_runs`)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def start_run(mlflow: Any, tags: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """``mlflow.start_run`` with the owner tags, nested under the pipeline invocation's
    parent run when there is one (and the run has no other parent)."""
    extra = owner_tags()
    if PIPELINE["run_id"] and "parent_run_id" not in kwargs and "run_id" not in kwargs:
        extra["mlflow.parentRunId"] = PIPELINE["run_id"]
    return mlflow.start_run(tags=extra | (tags or {}), **kwargs)


@contextlib.contextmanager
def pipeline_run(cfg: TrackingConfig, tags: dict[str, str]) -> Iterator[Any]:
    """One parent MLflow run for a pipeline invocation: every step's runs are nested under
    it (by tag, so it works from Prefect's task threads too). Yields the client and run id;
    the run ends FINISHED, or FAILED if the pipeline raised."""
    mlflow = setup_tracking(cfg)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    run = client.create_run(
        exp.experiment_id, run_name="pipeline", tags=owner_tags() | {"role": "pipeline"} | tags
    )
    PIPELINE["run_id"] = run.info.run_id
    status = "FAILED"
    try:
        yield client, run.info.run_id
        status = "FINISHED"
    finally:
        PIPELINE["run_id"] = None
        client.set_terminated(run.info.run_id, status)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_runs(cfg: TrackingConfig, own_pid: int | None = None) -> int:
    """Mark KILLED the runs of this experiment left RUNNING by a dead process on this host,
    and (interrupt) the RUNNING or FAILED runs of `own_pid`. Returns how many."""
    mlflow = setup_tracking(cfg)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`{HOST_TAG}` = '{host}' and attributes.status != 'FINISHED'",
        max_results=1000,
    )
    closed = 0
    for r in runs:
        pid = int(r.data.tags.get(PID_TAG, "0") or 0)
        stale = r.info.status == "RUNNING" and pid != os.getpid() and not _alive(pid)
        mine = pid == own_pid and r.info.status in ("RUNNING", "FAILED")
        if stale or mine:
            client.set_terminated(r.info.run_id, "KILLED")
            _drop_orphan_models(client, exp.experiment_id, r.info.run_id)
            closed += 1
    if closed:
        log.info(
            "closed %d MLflow run(s) left running by a stopped process (status KILLED)", closed
        )
    return closed


def _drop_orphan_models(client: Any, experiment_id: str, run_id: str) -> None:
    """Delete the logged models of a killed run that no model version points at (register
    stopped between logging the model and creating its version)."""
    for m in client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    ):
        if "mlflow.modelVersions" not in m.tags:
            client.delete_logged_model(m.model_id)
            log.info(
                "deleted logged model %s of the killed run %s (never registered)",
                m.model_id,
                run_id,
            )


def _artifact_location(cfg: TrackingConfig) -> str | None:
    """Where a new experiment keeps its artifacts. A URI (s3://, mlflow-artifacts:/...) as
    given; a local folder as an absolute file URI, except against a tracking server, whose
    clients on other machines could not read this machine's folder: there the server's own
    (proxied, with --serve-artifacts) location is used."""
    loc = cfg.artifact_location
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", loc):
        return loc
    if is_server(cfg.uri):
        return None
    return Path(loc).resolve().as_uri()


def run_link(cfg: TrackingConfig, run_id: str) -> str:
    """Where to see an MLflow run: the server's page; for a local store (no server runs), its
    id and the page `transferops ui` serves."""
    mlflow = setup_tracking(cfg)
    page = f"/#/experiments/{mlflow.get_run(run_id).info.experiment_id}/runs/{run_id}"
    if is_server(cfg.uri):
        return mask(cfg.uri.rstrip("/")) + page
    return f"{run_id} (`transferops ui`, then http://127.0.0.1:5000{page})"


def _meta_dataset(folder: Path | str, name: str, data_hash: str) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local folder
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(folder).resolve()))
    return MetaDataset(source, name=name, digest=data_hash[:12])


def log_data(mlflow: Any, folder: Path | str, name: str, data_hash: str, context: str) -> None:
    """The prepared data as the active run's dataset input (the MLflow UI's Datasets
    column): its name, the data hash as its digest, the prepared folder as its source."""
    mlflow.log_input(_meta_dataset(folder, name, data_hash), context=context)


def log_dataset(
    client: Any, run_id: str, folder: Path | str, name: str, data_hash: str, context: str
) -> None:
    """:func:`log_data` for a run that is not the active one (the pipeline's parent run)."""
    from mlflow.entities import DatasetInput, InputTag

    ds = _meta_dataset(folder, name, data_hash)._to_mlflow_entity()
    client.log_inputs(run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", context)])])


PARAM_CHARS = 500  # MLflow's limit for a param value on older servers


def flat_params(node: Any, prefix: str = "") -> dict[str, str]:
    """A nested params dict as dotted keys -> strings (passwords masked, cut at
    :data:`PARAM_CHARS`)."""
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for k, v in node.items():
            out |= flat_params(v, f"{prefix}{k}.")
        return out
    text = mask(str(node))  # a store URL's password never reaches MLflow
    return {prefix[:-1]: text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 3] + "..."}


def log_run_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    """Every params.yaml value a run used, as MLflow params (``data.image.size`` ...)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(flat_params(params).items())]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[i : i + 100])


def log_outcome(
    mlflow: Any,
    val_accuracy: float,
    avg: dict[str, Any] | None,
    precision: str | None = None,
    block_lr_scale: float | None = None,
) -> None:
    """A finished training run's score, and whether its weights are the mean of the last
    epochs' (``finetune.average_epochs``, the model spec's ``weight_average``): then the score
    is above every point of the run's val curve, and the run says why. `precision` and
    `block_lr_scale` (the spec's): what finetune.precision resolved to on the machine that
    trained it and what finetune.block_lr_scale resolved to for its model family (the params
    logged are the settings, e.g. auto)."""
    mlflow.log_metric("best_val_accuracy", val_accuracy)
    if precision:
        mlflow.set_tag("precision", precision)
    if block_lr_scale is not None:
        mlflow.set_tag("block_lr_scale", str(block_lr_scale))
    if avg:
        mlflow.log_metric("averaged_val_accuracy", avg["val_accuracy"])
        mlflow.set_tag(
            "weights",
            f"mean of the last {avg['epochs']} epochs" if avg["kept"] else "best epoch",
        )


def log_epoch(epoch: int, record: dict[str, float]) -> None:
    """An engine ``on_epoch_end`` hook: the epoch's metrics into the active MLflow run."""
    import mlflow

    with critical():  # an interrupt must not land inside the store's transaction
        mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
