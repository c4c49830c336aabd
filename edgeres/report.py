"""Rendering results: one rich Table per result, or JSON on stdout only."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
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
    for i, col in enumerate(columns):  # fold, never "269…": a cut-off number reads as another number
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
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
    table = make_table(result.title, columns, rows)
    if not console.is_terminal:  # piped or redirected: no screen edge to fit, so nothing is squeezed
        console.width = max(console.width, console.measure(table, options=console.options.update_width(10**4)).maximum)
    console.print(table)
    for note in notes or []:
        console.print(note, style="dim", highlight=False)


RANDOM_WEIGHTS = "random-init"  # a model run without trained weights (--random-init): its error means nothing


@dataclass(frozen=True)
class VariantRow:
    """One exported variant, measured the same way as every other row of the report."""

    variant: str
    target: str
    runtime: str
    precision: str
    pruned: float
    params: int
    macs: int
    size_mb: float
    latency_ms_p50: float | None  # batch 1; None where not measured (e.g. a Jetson bundle built here)
    throughput_ips: float | None  # batch 64
    top1_error: float  # percent, through the runtime, on eval_images test images
    top1_error_delta: float  # vs the FP32 baseline row
    top1_accuracy: float
    eval_images: int
    file: str
    latency_source: str = "measured"
    model: str = ""
    weights: str | None = None  # the weights' source; RANDOM_WEIGHTS: top-1 figures mean nothing
    int8_macs_pct: float | None = None  # share of MACs that runs in INT8 (coverage.Coverage), percent
    int8_coverage: dict | None = None  # its source (measured / expected), float layers

    @property
    def coverage_cell(self) -> str | None:
        if self.int8_macs_pct is None:
            return None
        expected = self.int8_coverage and not str(self.int8_coverage.get("source", "")).startswith("measured")
        return f"{self.int8_macs_pct:.1f}" + (" (expected)" if expected else "")

    def to_dict(self) -> dict:
        return asdict(self)


ROW_COLUMNS = ["variant", "target", "precision", "pruned", "params", "MACs", "INT8 MACs %", "size MB", "p50 ms (b1)",
               "img/s (b64)", "top-1 err %", "Δ err pp"]


def _row_cells(r: VariantRow) -> list:
    random = r.weights == RANDOM_WEIGHTS
    err, delta = ("n/a (random weights)", "n/a") if random else (r.top1_error, r.top1_error_delta)
    variant = f"{r.variant} (random weights)" if random else r.variant
    return [variant, r.target, r.precision, f"{r.pruned:.0%}" if r.pruned else "-", r.params, r.macs,
            r.coverage_cell, r.size_mb, r.latency_ms_p50, r.throughput_ips, err, delta]


@dataclass(frozen=True)
class ExportReport:
    """What `edgeres export` measured for one model and target."""

    model: str
    target: str
    out: str
    rows: list[VariantRow]
    fold: dict = field(default_factory=dict)
    prune: dict | None = None
    quantization: dict | None = None
    agreement: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extras: dict = field(default_factory=dict)
    host: dict | None = None  # where latency was measured: hostcpu.describe() plus "threads"; None if nowhere
    budget: dict | None = None  # --max-drop: budget.SearchResult.to_dict() plus the final test figures

    @property
    def title(self) -> str:
        n = self.rows[0].eval_images if self.rows else 0
        runtime = self.rows[-1].runtime if self.rows else "-"
        return f"{self.model} -> {self.target}  ({self.out}; top-1 through {runtime} on {n:,} test images)"

    def to_dict(self) -> dict:
        return {"model": self.model, "target": self.target, "out": self.out,
                "rows": [r.to_dict() for r in self.rows], "bn_fold": self.fold, "pruning": self.prune,
                "quantization": self.quantization, "logits_agreement": self.agreement, "notes": self.notes,
                "host": self.host, **({"budget": self.budget} if self.budget is not None else {}), **self.extras}

    def table_rows(self):
        return ROW_COLUMNS, [_row_cells(r) for r in self.rows]


_PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}


@dataclass(frozen=True)
class CombinedReport:
    """Rows of many export folders in one table: by model, target, pruning, precision."""

    rows: list[VariantRow]
    sources: list[str]
    title: str = "edgeres report"

    def to_dict(self) -> dict:
        return {"sources": self.sources, "rows": [r.to_dict() for r in self.rows]}

    def table_rows(self):
        return ["model", *ROW_COLUMNS], [[r.model, *_row_cells(r)] for r in self.rows]

    def markdown(self) -> str:
        cols, rows = self.table_rows()
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"


def combine(dirs: list[str | Path]) -> CombinedReport:
    """Read DIR/report.json of each export folder; rows sorted by model, target, pruning, precision."""
    from edgeres.errors import EdgeresError

    rows: list[VariantRow] = []
    seen: set[tuple] = set()
    for d in dirs:
        path = Path(d) / "report.json" if Path(d).is_dir() else Path(d)
        if not path.is_file():
            raise EdgeresError(f"{d} has no report.json; pass export folders written by `edgeres export`")
        try:
            doc = json.loads(path.read_text())
            fields_ = set(VariantRow.__dataclass_fields__)
            for raw in doc["rows"]:
                row = VariantRow(**{k: v for k, v in raw.items() if k in fields_})
                row = VariantRow(**{**asdict(row), "model": doc["model"]})
                key = (row.model, row.target, row.variant, row.file, str(path.parent))
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
        except (KeyError, TypeError, ValueError, OSError) as exc:  # ValueError: bad JSON, bad UTF-8
            raise EdgeresError(f"{path} is not an edgeres report ({exc})") from exc
    rows.sort(key=lambda r: (r.model, r.target, r.pruned, _PRECISION_ORDER.get(r.precision, 9), r.variant))
    return CombinedReport(rows, [str(d) for d in dirs])


def print_error(message: str) -> None:
    """The one red `error: ...` line on stderr that a user error becomes."""
    from edgeres.progress import console

    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def tradeoff_front(rows: list[VariantRow]) -> list[VariantRow]:
    """Rows no other row beats on both top-1 error and batch-1 latency (measured latency only), fastest first."""
    timed = sorted((r for r in rows if r.latency_ms_p50 is not None), key=lambda r: (r.latency_ms_p50, r.top1_error))
    front: list[VariantRow] = []
    for r in timed:
        if not front or r.top1_error < front[-1].top1_error:
            front.append(r)
    return front


def plot_tradeoff(report: CombinedReport, path: str | Path) -> Path:
    """Top-1 error against batch-1 latency for every variant with a measured latency; the Pareto front joined.

    Variants whose latency was not measured here (TensorRT bundles) are listed under the plot, not placed.
    Written atomically; the format follows the suffix (png, svg, pdf).
    """
    import textwrap

    from edgeres.errors import EdgeresError
    from edgeres.io import atomic_write, check_output_file

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise EdgeresError("--plot needs matplotlib: pip install 'edgeres[plot]' (or matplotlib)") from exc
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    if fmt not in ("png", "svg", "pdf"):
        raise EdgeresError(f"--plot writes .png, .svg or .pdf, got {path.name}")
    check_output_file(path, option="--plot")  # a file of the user's is never replaced
    timed = [r for r in report.rows if r.latency_ms_p50 is not None]
    untimed = [r for r in report.rows if r.latency_ms_p50 is None]
    if not timed:
        raise EdgeresError("no variant in these folders has a measured latency to plot; measure on the device "
                           "(`edgeres bench`) or pass CPU export folders")
    front = tradeoff_front(timed)
    fig = Figure(figsize=(8, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    precisions = sorted({r.precision for r in timed})
    colours = dict(zip(precisions, ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"], strict=False))
    for prec in precisions:
        pts = [r for r in timed if r.precision == prec]
        ax.scatter([r.latency_ms_p50 for r in pts], [r.top1_error for r in pts], s=40,
                   color=colours.get(prec, "tab:gray"), label=prec, zorder=3)
    for r in timed:
        label = f"{r.model} {r.variant}" + (f" [{r.target}]" if len({x.target for x in timed}) > 1 else "")
        ax.annotate(label, (r.latency_ms_p50, r.top1_error), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.plot([r.latency_ms_p50 for r in front], [r.top1_error for r in front], color="tab:red", lw=1.2, ls="--",
            marker="o", mfc="none", ms=11, label="Pareto front", zorder=2)
    ax.set_xlabel("latency, batch 1, p50 (ms; measured where each report says)")
    ax.set_ylabel("top-1 error % (through the runtime that ships)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    title = "top-1 error vs latency: " + ", ".join(sorted({r.model for r in timed}))
    if untimed:
        title += "\nnot placed (latency not measured here): " + "; ".join(
            f"{r.model} {r.variant} [{r.target}] {r.top1_error:.2f} %" for r in untimed)
    fig.suptitle("\n".join(textwrap.wrap(title, 120)), fontsize=8)
    with atomic_write(path) as tmp:  # a PNG says it is edgeres's, so a rerun may replace it
        fig.savefig(tmp, format=fmt, dpi=120, metadata={"Software": "edgeres"} if fmt == "png" else None)
    return path
