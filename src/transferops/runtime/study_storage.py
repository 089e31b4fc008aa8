"""The Optuna study's storage: any SQLAlchemy URL, with a heartbeat that fails and retries
(once) a trial whose process died, also one that died before its first heartbeat."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.storages._rdb import models as _rdb_models  # the heartbeat table (see _Storage)

from transferops.config import SearchConfig
from transferops.errors import ConfigError
from transferops.runtime.redact import expand_env, mask

# Heartbeats, the retry callback and the matplotlib plots are marked experimental in Optuna 5
# (for every module that opens a study: search, services, interrupt).
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class _Storage(optuna.storages.RDBStorage):
    """RDBStorage that also fails trials whose process died before their first heartbeat.

    Optuna starts a trial (``ask``) and only then its heartbeat thread. A process killed in
    between leaves a RUNNING trial with no heartbeat row, which Optuna never counts as stale,
    so it would stay RUNNING forever. A live trial writes its first heartbeat at once, so one
    with none after the grace period is treated like one whose heartbeat stopped.
    """

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 0))
        now = datetime.now()  # the model's datetime_start is naive local time, like this
        trial, beat = _rdb_models.TrialModel, _rdb_models.TrialHeartbeatModel
        with self.scoped_session() as session:
            orphans = (
                session.query(trial)
                .filter(trial.study_id == study_id)
                .filter(trial.state == optuna.trial.TrialState.RUNNING)
                .filter(trial.trial_id.not_in(session.query(beat.trial_id)))
                .all()
            )
            for t in orphans:
                start = t.datetime_start
                if start is not None and now - start > grace and t.trial_id not in stale:
                    stale.append(t.trial_id)
        return stale


def make_storage(sc: SearchConfig) -> optuna.storages.RDBStorage:
    """RDB storage with a heartbeat: a trial whose process died is failed and retried once."""
    url = expand_env(sc.storage, "search.storage")
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}  # workers wait for the write lock
    elif url.startswith("postgresql"):
        kwargs = {"connect_args": {"connect_timeout": 10}}  # fail in seconds, not minutes
    try:
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _Storage(
            url,
            engine_kwargs=kwargs,
            heartbeat_interval=sc.heartbeat_s,
            grace_period=2 * sc.heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1
            ),
        )
    except Exception as exc:  # any failure to open it is a config problem: one line
        detail = mask(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise ConfigError(
            f"search.storage {mask(sc.storage)} cannot be opened ({type(exc).__name__}: "
            f"{detail}). Check the URL (an SQLAlchemy URL such as sqlite:///optuna.db or "
            "postgresql+psycopg://user:${PASSWORD}@host/db), that its driver is installed, "
            "and that the server is reachable"
        ) from None
