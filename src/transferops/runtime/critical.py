"""Blocks an interrupt must not split: the per-epoch writes to the tracking and study stores.

Without Prefect a Ctrl-C or SIGTERM becomes a KeyboardInterrupt in the main thread
(:mod:`transferops.runtime.interrupt`), wherever that thread is. Raised inside a SQLAlchemy session
(MLflow's or Optuna's, on sqlite), it leaves the connection mid-transaction holding the
database lock, and the clean-up that follows (ending the MLflow run, failing the trial) fails
with "database is locked" instead of exiting 130. On small data those writes are most of an
epoch's time, so the chance is not small. A signal that arrives inside :func:`critical` is
kept and raised when the block ends, a few milliseconds later.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_STATE = {"depth": 0, "pending": False}


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Run the block whole: an interrupt that arrives meanwhile is raised after it."""
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1
        if _STATE["depth"] == 0 and _STATE["pending"]:
            _STATE["pending"] = False
            raise KeyboardInterrupt


def defer_interrupt() -> bool:
    """For the signal handler: True, and the interrupt kept for later, inside a block."""
    if _STATE["depth"] > 0:
        _STATE["pending"] = True
        return True
    return False
