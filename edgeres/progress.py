"""Progress bars and messages on stderr, so stdout stays clean for --json."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
console = Console(stderr=True)


def _enabled() -> bool:
    return not os.environ.get("EDGERES_QUIET") and sys.stderr.isatty() or bool(os.environ.get("EDGERES_PROGRESS"))


@contextlib.contextmanager
def progress() -> Iterator[Progress]:
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not _enabled(),
        transient=False,
    )
    with bar:
        yield bar


def track(items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
    """Iterate with a progress bar on stderr (only on a terminal, or with EDGERES_PROGRESS=1)."""
    with progress() as bar:
        task = bar.add_task(desc, total=total, status="")
        for item in items:
            yield item
            bar.advance(task)


def info(message: str) -> None:
    if not os.environ.get("EDGERES_QUIET"):
        console.print(message, highlight=False)
