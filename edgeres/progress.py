"""Progress on stderr, so stdout stays clean for --json: bars on a terminal, timed lines in logs."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
PLAIN_EVERY_S = 30.0  # a log (CI, nohup, `2> file`) gets a line per task at most this often, and one at the end


def _quiet() -> bool:
    return bool(os.environ.get("EDGERES_QUIET"))


@dataclass
class _Task:
    desc: str
    total: int | None
    status: str = ""
    done: int = 0
    started: float = 0.0
    printed: float = 0.0


class PlainProgress:
    """The part of rich's Progress that edgeres uses, as plain lines: where no bar can redraw, a long QAT
    or training epoch still shows it is alive and how far it got."""

    def __init__(self, every_s: float = PLAIN_EVERY_S, stream=None) -> None:
        self.every_s, self.stream = every_s, stream or sys.stderr
        self.tasks: list[_Task] = []

    def add_task(self, desc: str, total: int | None = None, status: str = "") -> int:
        now = time.monotonic()
        self.tasks.append(_Task(desc, total, status, started=now, printed=now))
        return len(self.tasks) - 1

    def update(self, task_id: int, *, advance: int = 0, status: str | None = None) -> None:
        task = self.tasks[task_id]
        task.done += advance
        if status is not None:
            task.status = status
        now = time.monotonic()
        finished = task.total is not None and task.done >= task.total
        if finished or now - task.printed >= self.every_s:
            task.printed = now
            of = f"/{task.total} ({100 * task.done / task.total:.0f}%)" if task.total else ""
            status_text = f" {task.status}" if task.status else ""
            print(f"{task.desc}: {task.done}{of}{status_text}, {now - task.started:.0f} s", file=self.stream,
                  flush=True)


@contextlib.contextmanager
def progress() -> Iterator[Progress | PlainProgress]:
    """A rich bar on a terminal; timed plain lines when stderr is a file or pipe; nothing with EDGERES_QUIET."""
    if not _quiet() and not sys.stderr.isatty():
        yield PlainProgress()
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=_quiet(),
        transient=False,
    )
    with bar:
        yield bar


def info(message: str) -> None:
    if not _quiet():
        console.print(message, highlight=False)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Drop other libraries' Python warnings and log records below ERROR inside the block (EDGERES_DEBUG=1 keeps
    them): the exporter's constant-folding notes, NNCF's INFO lines, torchao's missing-kernel notes are not the
    user's business on a clean run. Scoped: the warning filters and logging's disable level are restored on exit.
    Log levels are not touched: NNCF and torch reset their loggers' levels when first imported (often inside)."""
    if os.environ.get("EDGERES_DEBUG"):
        yield
        return
    before = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a library's warning names its caller's line: edgeres's, often)
        logging.disable(max(before, logging.WARNING))
        try:
            yield
        finally:
            logging.disable(before)
