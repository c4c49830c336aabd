"""Rendering results: one rich Table per result, or JSON on stdout only."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table


class Tabular(Protocol):
    """What a renderable result provides."""

    title: str

    def to_dict(self) -> dict | list: ...

    def table_rows(self) -> tuple[list[str], list[list[Any]]]: ...


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 0.01 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def make_table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    return table


def to_json(obj: Any) -> str:
    def default(o: Any) -> Any:
        if hasattr(o, "to_dict"):
            return o.to_dict()
        return str(o)

    return json.dumps(obj, indent=2, default=default)


def render(result: Tabular, *, as_json: bool = False, notes: list[str] | None = None) -> None:
    """Print `result` as a table on stdout (notes below it), or only JSON with as_json."""
    if as_json:
        sys.stdout.write(to_json(result.to_dict()) + "\n")
        return
    console = Console()
    columns, rows = result.table_rows()
    console.print(make_table(result.title, columns, rows))
    for note in notes or []:
        console.print(note, style="dim", highlight=False)
