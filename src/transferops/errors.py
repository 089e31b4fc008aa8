"""User-facing errors.

Every error a user can cause (bad params, bad data, unreachable source) is raised as a
subclass of :class:`TransferopsError` whose message names the field or file and says what
would fix it. The CLI prints these without a traceback; anything else is a bug.
"""

from __future__ import annotations

import errno


class TransferopsError(Exception):
    """Base class for errors caused by input the user can fix."""


class ConfigError(TransferopsError):
    """params.yaml or an override is invalid."""


class DataError(TransferopsError):
    """The input data cannot be read or does not fit the configured splits."""


class SourceError(TransferopsError):
    """The source model cannot be found, loaded or trusted."""


class RegistryError(TransferopsError):
    """The registry cannot do what was asked (nothing registered, stale evaluation, ...)."""


class IntegrityError(TransferopsError):
    """A model's weights differ from the sha256 recorded when they were saved or registered."""


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return seen


def known_fault(exc: BaseException) -> str | None:
    """A one-line message for faults of the machine rather than of transferops (a full disk,
    a damaged sqlite store), wherever they surface, or None for anything else."""
    for e in _chain(exc):
        text = str(e)
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
            s in text for s in ("No space left on device", "database or disk is full")
        ):
            where = f" (writing {e.filename})" if getattr(e, "filename", None) else ""
            return (
                f"no space left on device{where}: free disk space and run the command again "
                "(finished steps are kept and not redone)"
            )
        if any(s in text for s in ("database disk image is malformed", "file is not a database")):
            return (
                "a sqlite store of this project (tracking.uri's mlflow.db or search.storage's "
                "optuna.db) is damaged (database disk image is malformed): restore it from a "
                "backup, or move it aside to start an empty one"
            )
    return None
