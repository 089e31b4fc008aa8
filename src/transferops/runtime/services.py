"""The configured services, checked before the first step: a one-line error in seconds.

Without this an unreachable MLflow server surfaces minutes later, after the client's
retries, as a long traceback in the middle of a step. Each check has a short timeout and
names the key, the URL (password masked) and what to check.
"""

from __future__ import annotations

import logging
import socket
import urllib.parse

from transferops.config import Config
from transferops.errors import ConfigError
from transferops.runtime.redact import mask
from transferops.runtime.study_storage import make_storage
from transferops.runtime.tracking import check_reachable

log = logging.getLogger(__name__)


def check_services(cfg: Config) -> None:
    """Check every service the pipeline will use; raise :class:`ConfigError` on the first
    that is unreachable or invalid."""
    check_reachable("tracking.uri", cfg.tracking.uri)
    if cfg.source.kind == "mlflow" and cfg.source.registry_uri:
        check_reachable("source.registry_uri", cfg.source.registry_uri)
    make_storage(cfg.search)  # raises a one-line ConfigError when it cannot be opened
    check_scheduler(cfg.compute.cluster)
    log.debug("services reachable: %s, %s", mask(cfg.tracking.uri), mask(cfg.search.storage))


def check_scheduler(address: str | None, timeout_s: float = 5.0) -> None:
    """A Dask scheduler listens at `address` (``tcp://host:port``; None passes)."""
    if address is None:
        return
    url = urllib.parse.urlsplit(address)
    try:
        socket.create_connection((url.hostname or "", url.port or 8786), timeout_s).close()
    except OSError as exc:
        raise ConfigError(
            f"compute.cluster {address} is not reachable ({exc}): start the scheduler "
            "(`dask scheduler`, then `dask worker <address>` per machine) or set "
            "compute.cluster: null to run on this machine"
        ) from None
