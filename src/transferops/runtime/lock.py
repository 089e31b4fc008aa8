"""One run per project folder: an advisory lock held for the whole run.

Two runs in one folder would write the same checkpoints, study and model folders at once. The
lock is ``flock`` on ``.transferops.runtime.lock`` in the working directory (where every output path
points): the kernel releases it when its process dies however it dies, so a stale lock
cannot outlive its holder and never needs clearing by hand on one machine. The file holds
the holder's pid, host and start time, for the message a second run prints. Re-entrant
within a process: `transferops run` takes it before Prefect starts and the flow's steps
take it again for free.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from transferops.errors import TransferopsError

LOCK_FILE = ".transferops.runtime.lock"
_held: dict[Path, int] = {}  # lock path -> nesting depth in this process
_files: dict[Path, int] = {}  # lock path -> the open descriptor holding the flock


class LockedError(TransferopsError):
    """Another process is running transferops in this folder."""


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"]))
        return f"pid {h['pid']} on {h['host']} ({h['command']}), running since {since}"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def project_lock(command: str, folder: Path | str = ".") -> Iterator[None]:
    """Hold the folder's lock for the block; raise :class:`LockedError` at once if another
    process holds it."""
    path = (Path(folder) / LOCK_FILE).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockedError(
            f"another transferops run is using {path.parent}: {_holder(path)}. Wait for it to "
            f"finish (or stop it); a run that died releases the lock by itself. On a shared "
            f"file system whose locks do not reach other machines, run each in its own folder"
        ) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info | {"started": time.time()}).encode())
    _held[path], _files[path] = 1, fd
    try:
        yield
    finally:
        _held[path] -= 1
        if _held[path] == 0:
            del _held[path]
            os.close(_files.pop(path))  # closing the descriptor releases the flock
