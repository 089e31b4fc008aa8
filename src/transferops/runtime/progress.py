"""Rich progress bars and logging for long work (decoding, feature caching, training)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from transferops.errors import TransferopsError
from transferops.runtime.redact import MaskFilter

T = TypeVar("T")
console = Console(stderr=True)


def progress_enabled() -> bool:
    """Bars are drawn on a terminal unless TRANSFEROPS_PROGRESS=0."""
    flag = os.environ.get("TRANSFEROPS_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no")
    return console.is_terminal


def verbose() -> bool:
    """`transferops -v` (TRANSFEROPS_VERBOSE=1, inherited by workers): third-party libraries'
    own lines and bars are shown, and transferops' debug lines."""
    return os.environ.get("TRANSFEROPS_VERBOSE", "") in ("1", "true", "yes")


def quiet(*loggers: str, level: int = logging.WARNING) -> None:
    """Raise third-party loggers to `level` unless verbose: their info lines (tables created,
    study created, input example validated) are noise beside transferops' own."""
    if not verbose():
        for name in loggers:
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def muted(*loggers: str, level: int = logging.ERROR) -> Iterator[None]:
    """`loggers` raised to `level` for the block: for work whose warnings were already said
    (the few-shot subsets re-read the data the main `prepare` warned about)."""
    before = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(level)
        yield
    finally:
        for name, lvl in before.items():
            logging.getLogger(name).setLevel(lvl)


_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("run_label", default="")


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Name the run that the bars and epoch lines inside belong to (e.g. ``scratch-s0``)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def run_label(text: str) -> str:
    """`text` prefixed with the current run's label, if any."""
    label = _LABEL.get()
    return f"{label}: {text}" if label else text


def make_progress() -> Progress:
    """A Progress with the columns used everywhere (description, bar, n/N, elapsed, eta)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not progress_enabled(),
    )


def progress_bar(items: Sequence[T] | Iterable[T], description: str) -> Iterator[T]:
    """Iterate `items` with a progress bar."""
    total = len(items) if isinstance(items, Sequence) else None
    with make_progress() as prog:
        task = prog.add_task(description, total=total, info="")
        for item in items:
            yield item
            prog.advance(task)


def setup_logging() -> None:
    """Log through Rich to stderr (idempotent); debug lines too when verbose."""
    root = logging.getLogger("transferops")
    if any(isinstance(h, RichHandler) for h in root.handlers):
        return
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(MaskFilter())  # no URL password reaches the terminal
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose() else logging.INFO)


class NoUserErrorTraceback(logging.Filter):
    """Keep Prefect's one-line "failed with exception" records but drop their traceback when
    the exception is a user error: the CLI prints it as one `error:` line, and a traceback
    of a bad param or bad data only hides it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TransferopsError):
            record.exc_info, record.exc_text = None, None
        return True


def hand_logging_to_prefect() -> None:
    """Inside a Prefect flow run, Prefect's handlers print (and ship to the API) the
    `transferops` logs; drop ours so each line shows once."""
    root = logging.getLogger("transferops")
    for h in [h for h in root.handlers if isinstance(h, RichHandler)]:
        root.removeHandler(h)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(NoUserErrorTraceback())
