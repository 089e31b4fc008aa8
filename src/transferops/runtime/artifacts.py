"""Hashing and atomic writes shared by every stage.

Rules from DESIGN §7: a file or directory a stage produces appears complete or not at all
(temp + rename), so an interrupted run never leaves a half-written artifact that a later run
would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path], root: Path) -> str:
    """One sha256 over several files: each relative path and its content hash, sorted."""

    def rel(p: Path) -> str:
        try:
            return p.relative_to(root).as_posix()
        except ValueError:  # a file outside root (e.g. an absolute path in a table)
            return p.as_posix()

    h = hashlib.sha256()
    for p in sorted(paths, key=rel):
        h.update(rel(p).encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of a JSON-serialisable object in canonical form (sorted keys)."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    ).hexdigest()


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it: set, then put back (at import, once)
    os.umask(mask)
    return mask


# Temp files and folders are created private (0600 / 0700); what they become is published
# with the modes any other file here would get (0644 / 0755 under the usual umask), so
# colleagues on a shared server can read reports and models.
UMASK = _read_umask()
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` via a temp file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def publish_modes(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the umask's modes: temp files, and
    what some writers create (safetensors writes 0600), would stay private otherwise."""
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if p.is_symlink():
            continue
        exe = p.stat().st_mode & 0o111 & ~UMASK
        p.chmod(DIR_MODE if p.is_dir() else FILE_MODE | exe)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside `target`; on success it replaces `target`.

    On an exception the temp directory is removed and `target` is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_modes(tmp)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: str, dst: str) -> str:
    """`src` hard-linked at `dst` (no second copy of the bytes), or copied where links are
    not possible (another file system, a store without links). Safe for this package's
    outputs: every file in them is written once, into a fresh temporary folder
    (:func:`atomic_dir`, :func:`write_json_atomic`), never rewritten in place, so no write
    through one link can change the other. A symlink or a read-only file is copied: it may
    be DVC's cache (a checkout with ``cache.type: symlink`` or ``hardlink``), whose files
    must stay read-only, and publishing a link (:func:`publish_modes`) would change its mode."""
    if not os.path.islink(src) and os.stat(src).st_mode & stat.S_IWUSR:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass
    shutil.copy2(src, dst)
    return dst


def copy_folder(src: Path, dst: Path) -> None:
    """A model folder's tree at `dst`, its files hard-linked where possible
    (:func:`link_or_copy`): a reused model costs no disk (a text encoder's 90 MB a copy,
    five copies a pipeline run)."""
    shutil.copytree(src, dst, copy_function=link_or_copy, dirs_exist_ok=True)


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def save_weights(module: Any, path: Path | str) -> None:
    """A module's state dict as safetensors (contiguous CPU clones: safetensors refuses
    tensors that share storage, e.g. tied weights)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path))
