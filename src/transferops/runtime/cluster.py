"""Fan-out on Dask: search trials and baseline runs as tasks of a ``dask.distributed`` cluster.

- ``compute.cluster: tcp://host:8786``: the tasks go to that running scheduler's workers
  (``dask scheduler`` on one machine, ``dask worker tcp://host:8786`` on each other one).
- else ``compute.n_workers > 1``: a local cluster of that many single-threaded worker
  processes lives for the step (Dask's ``LocalCluster``: a nanny restarts a dead worker and
  the scheduler reruns its task).
- else nothing here runs: the step trains in its own process, as before.

A task reads and writes the project folder by the same absolute path (prepared data, model
folders, a sqlite store), so workers on other machines need that folder mounted at that path
and the stores to be servers (a PostgreSQL study, an MLflow server): docs/scale-out.md.
Worker-side ``transferops`` log lines are forwarded to this process, so they show in the
terminal and, under Prefect, in the flow run's log.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from distributed import Client, LocalCluster, get_worker

from transferops.config import ComputeConfig
from transferops.errors import ConfigError
from transferops.runtime import tracking
from transferops.runtime.interrupt import STATE
from transferops.runtime.memory import tensor_sized_malloc
from transferops.runtime.progress import quiet

log = logging.getLogger(__name__)
T = TypeVar("T")
CONNECT_TIMEOUT_S = 10


def uses_dask(cc: ComputeConfig) -> bool:
    """Whether the step's tasks go to Dask (else they run in this process)."""
    return cc.cluster is not None or cc.n_workers > 1


@contextlib.contextmanager
def dask_client(cc: ComputeConfig) -> Iterator[Client]:
    """A client of ``compute.cluster``, or of a local cluster of ``compute.n_workers``
    processes that is shut down when the block ends."""
    if cc.cluster is not None:
        try:
            client = Client(cc.cluster, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                f"compute.cluster {cc.cluster}: no Dask scheduler answers ({exc}). Start one "
                "(`dask scheduler`, then `dask worker <address>` per machine) or set "
                "compute.cluster: null to run on this machine"
            ) from None
        with client:
            _forward_logs(client)
            yield client
        return
    with _package_first_on_path():  # workers are spawned: they import with our sys.path
        cluster = LocalCluster(
            n_workers=cc.n_workers,
            threads_per_worker=1,  # torch threads are set per task (run_in_project)
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,  # Dask's own start/stop lines
        )
    with cluster, Client(cluster) as client:
        _forward_logs(client)
        # an interrupt fails the trials these processes were running (interrupt.finish)
        STATE["workers"].update(client.run(os.getpid).values())
        yield client


def _forward_logs(client: Client) -> None:
    client.forward_logging("transferops", level=logging.INFO)
    quiet("distributed.client", level=logging.ERROR)


@contextlib.contextmanager
def _package_first_on_path() -> Iterator[None]:
    """A registered model loaded in this process put its shipped (inference-only) copy of
    transferops first on sys.path; spawned workers must import this package instead."""
    saved = list(sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # src/: transferops/runtime/
    try:
        yield
    finally:
        sys.path[:] = saved


def task_context(client: Client) -> dict[str, Any]:
    """What every task needs from this process: the project folder, the pipeline's parent
    MLflow run, and how many workers share each host (to split its cores)."""
    hosts = collections.Counter(
        w["host"] for w in client.scheduler_info(n_workers=-1)["workers"].values()
    )
    return {"root": str(Path.cwd()), "parent": tracking.PIPELINE["run_id"], "hosts": hosts}


def run_in_project(ctx: dict[str, Any], fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on a worker as if in this project's folder and pipeline run."""
    root = Path(ctx["root"])
    if not root.is_dir():
        raise ConfigError(
            f"Dask worker on {socket.gethostname()} cannot see the project folder {root}: "
            "mount it at the same path on every worker machine (docs/scale-out.md)"
        )
    tensor_sized_malloc()  # Dask's nanny starts workers with a 64 KiB trim threshold
    os.chdir(root)  # one task at a time per worker process (threads_per_worker=1)
    os.environ["TRANSFEROPS_PROGRESS"] = "0"  # bars of parallel tasks would interleave
    logging.getLogger("transferops").setLevel(logging.INFO)  # forwarded to the client
    tracking.PIPELINE["run_id"] = ctx["parent"]
    # Workers on one host share its cores: oversubscribed torch threads thrash
    sharing = ctx["hosts"].get(_my_host(), 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // sharing))
    return fn(*args)


def _my_host() -> str:
    return get_worker().address.split("://")[-1].rsplit(":", 1)[0]


def worker_label() -> str:
    """``host:pid`` of the process running a task (or this process)."""
    return f"{socket.gethostname()}:{os.getpid()}"


_STORES: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
KEEP_STORES = 2


def worker_store(key: tuple) -> dict:
    """A frozen-feature store that outlives one task on this worker process, so the next
    trial or baseline run on the same data and source skips the encoding; the two most
    recent are kept (a long-lived cluster serves many runs)."""
    if key not in _STORES:
        _STORES[key] = {}
        while len(_STORES) > KEEP_STORES:
            _STORES.popitem(last=False)
    _STORES.move_to_end(key)
    return _STORES[key]


def release_stores() -> None:
    """Drop this process's stores (the inline path, once a step is done with them)."""
    _STORES.clear()
