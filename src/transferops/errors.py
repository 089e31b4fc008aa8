"""User-facing errors.

Every error a user can cause (bad params, bad data, unreachable source) is raised as a
subclass of :class:`TransferopsError` whose message names the field or file and says what
would fix it. The CLI prints these without a traceback; anything else is a bug.
"""

from __future__ import annotations


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
