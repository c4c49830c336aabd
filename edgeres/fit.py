"""How wide can a WRN be on a target? Enumerate WRN-D-k (and pruning ratios), size each one, pick.

For each candidate: parameters, MACs, weight bytes at the target's precision, the peak of live
activations at batch B (a liveness pass over the exported ONNX graph, `edgeres.memory`), their sum,
latency and the expected top-1 error. Latency is measured (`edgeres.latency`) wherever the target's runtime
runs on this host, and estimated by a roofline from the profile's peak figures elsewhere (labelled "estimate").
Expected errors come from the user's own runs (`runs`), else the published WRN results in
`PUBLISHED_ERRORS`, else they are unknown. Memory is in MiB (2**20 bytes) throughout.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgeres import models, targets
from edgeres.backends.base import get_backend
from edgeres.errors import EdgeresError
from edgeres.io import check_output_file
from edgeres.latency import BenchOptions, Worker
from edgeres.memory import activation_memory, weight_bytes
from edgeres.progress import info

if TYPE_CHECKING:
    from edgeres.targets import Target
    from edgeres.train import TrainConfig

MIB = 2**20
SCHEMA = "edgeres-fit/1"

WRN_CITATION = (
    "Zagoruyko & Komodakis 2016, Wide Residual Networks (arXiv 1605.07146): test error %, flip/translation "
    "augmentation, meanstd normalization, median of 5 runs, as listed in github.com/szagoruyko/wide-residual-networks "
    "README.md"
)
# (dataset, depth, k) -> published top-1 test error % of the plain (no-dropout) WRN. Only figures read in
# the source above; every other depth/width is "unknown", never interpolated.
PUBLISHED_ERRORS: dict[tuple[str, int, int], float] = {
    ("cifar10", 28, 10): 4.00,
    ("cifar100", 28, 10): 19.25,
}


@dataclass(frozen=True)
class FitOptions:
    """What `edgeres fit wrn` can be asked; None-valued fields take the target's defaults."""

    depth: int = 16
    target: str = "cpu"
    budget_mb: float | None = None  # MiB; None: the target's memory_mb
    precision: str | None = None  # "fp32" | "fp16" | "int8"; None: the target's default precision
    batch: int | None = None  # None: the target's default batch
    latency_ms: float | None = None  # a latency limit at that batch, if any
    prune: tuple[float, ...] = ()  # pruning ratios tried at every width, besides the unpruned net
    runs: str | None = None  # folder of `edgeres train` run folders: expected errors from them
    max_width: int = 16  # stop here even when wider nets would still fit
    num_classes: int = 10
    input_size: int = 32
    dataset: str = "cifar10"  # which published results apply
    train: bool = False  # train the pick with the foundation trainer and report its measured error
    train_frontier: bool = False  # with train: every Pareto-optimal candidate that fits, not only the pick
    train_config: TrainConfig | None = None  # None: TrainConfig() (the paper recipe)
    train_data: str | None = None  # None: `dataset`
    train_subset: int | None = None  # train on a class-balanced subset (smoke runs)
    train_out: str = "runs/fit"
    plot: str | None = None  # write the Pareto plot (PNG) here
    bench: BenchOptions = field(default_factory=lambda: BenchOptions(batch_sizes=(1,), warmup=5, runs=30))
    seed: int = 0


@dataclass(frozen=True)
class Latency:
    """A latency figure and where it came from: "measured", "estimate" or "unknown" (ms is None)."""

    ms: float | None
    source: str
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExpectedError:
    """Top-1 error % expected of a candidate: from "runs", "published" or "unknown" (value None)."""

    top1_error: float | None
    source: str
    ref: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One WRN-D-k (possibly pruned) sized for the target."""

    model: str
    width: int
    prune: float
    params: int
    macs: int  # one image
    weight_bytes: int
    activation_bytes: int  # peak of live activations at the batch, the input included
    activation_unfused_bytes: int  # the same without conv+add fusion (runtimes that do not fuse)
    latency: Latency
    expected_error: ExpectedError
    fits_memory: bool
    fits_latency: bool | None  # None: no latency limit given
    measured_error: float | None = None  # after `train`
    checkpoint: str | None = None

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.fits_memory and self.fits_latency is not False

    @property
    def label(self) -> str:
        return self.model + (f" pruned {self.prune:.0%}" if self.prune else "")

    def to_dict(self) -> dict:
        return {
            "model": self.model, "width": self.width, "prune": self.prune, "params": self.params,
            "macs": self.macs, "weight_bytes": self.weight_bytes, "activation_bytes": self.activation_bytes,
            "activation_unfused_bytes": self.activation_unfused_bytes, "total_bytes": self.total_bytes,
            "total_mib": round(self.total_bytes / MIB, 4), "latency": self.latency.to_dict(),
            "expected_error": self.expected_error.to_dict(), "fits_memory": self.fits_memory,
            "fits_latency": self.fits_latency, "fits": self.fits, "measured_error": self.measured_error,
            "checkpoint": self.checkpoint,
        }


# ---------------------------------------------------------------- the pick


def pick(candidates: list[Candidate]) -> tuple[Candidate | None, str]:
    """The candidate to deploy and why: the lowest expected error among those that fit.

    When every fitting candidate has a known expected error, the lowest wins (ties: fewer bytes).
    Otherwise errors cannot be compared, and the largest fitting net (most parameters) wins: at a
    fixed depth wider WRNs err less (Zagoruyko & Komodakis 2016).
    """
    fitting = [c for c in candidates if c.fits]
    if not candidates:
        return None, "no candidates"
    if not fitting:
        smallest = min(candidates, key=lambda c: c.total_bytes)
        if not smallest.fits_memory:
            return None, (f"nothing fits: the smallest, {smallest.label}, needs {smallest.total_bytes / MIB:.3f} MiB")
        return None, f"nothing fits the latency limit: {smallest.label} fits memory but takes " \
                     f"{_fmt_ms(smallest.latency)}"
    if all(c.expected_error.top1_error is not None for c in fitting):
        best = min(fitting, key=lambda c: (c.expected_error.top1_error, c.total_bytes))
        return best, f"lowest expected error that fits ({best.expected_error.top1_error:.2f} %, " \
                     f"{best.expected_error.source})"
    best = max(fitting, key=lambda c: (c.params, -c.prune))
    binding = "latency" if any(c.fits_memory and c.fits_latency is False for c in candidates) else "memory"
    return best, f"the widest that fits ({binding} binds next); expected errors unknown for some, so width " \
                 "stands in for error (wider WRNs err less at a fixed depth)"


def _fmt_ms(lat: Latency) -> str:
    return "unknown latency" if lat.ms is None else f"{lat.ms:.3g} ms ({lat.source})"


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """Fitting candidates no other fitting one beats on size, latency and quality (error, or params)."""
    fitting = [c for c in candidates if c.fits]

    def quality(c: Candidate) -> float:
        e = c.expected_error.top1_error
        return -e if e is not None and all(x.expected_error.top1_error is not None for x in fitting) else c.params

    def dominates(a: Candidate, b: Candidate) -> bool:
        la = a.latency.ms if a.latency.ms is not None else math.inf
        lb = b.latency.ms if b.latency.ms is not None else math.inf
        no_worse = a.total_bytes <= b.total_bytes and la <= lb and quality(a) >= quality(b)
        better = a.total_bytes < b.total_bytes or la < lb or quality(a) > quality(b)
        return no_worse and better

    return [c for c in fitting if not any(dominates(o, c) for o in fitting if o is not c)]


# ---------------------------------------------------------------- expected errors


def _spec_key(spec: dict | None) -> str | None:
    return json.dumps(spec, sort_keys=True) if spec else None


@dataclass(frozen=True)
class RunRecord:
    model: str
    spec: str | None  # the pruned layer shapes as a key, None for an unpruned net
    error: float  # 100 - best test top-1 accuracy
    path: str
    data: str


def read_runs(root: str | Path) -> tuple[list[RunRecord], list[str]]:
    """Runs written by `edgeres train` under `root` (each: history.json + best.pt/last.pt): best test error."""
    from edgeres.checkpoint import read_checkpoint
    from edgeres.train import run_data_name

    root = Path(root)
    if not root.is_dir():
        raise EdgeresError(f"--runs {root} is not a folder; pass the folder holding `edgeres train --out` runs")
    records, notes = [], []
    for hist in sorted([root / "history.json", *root.glob("*/history.json")]):
        if not hist.is_file():
            continue
        run = hist.parent
        ckpt_path = next((p for p in (run / "best.pt", run / "last.pt") if p.is_file()), None)
        if ckpt_path is None:
            notes.append(f"{run}: no best.pt or last.pt; skipped")
            continue
        try:
            history = json.loads(hist.read_text())
            accs = [float(e["test"]["top1_accuracy"]) for e in history if isinstance(e, dict) and e.get("test")]
        except (ValueError, KeyError, TypeError) as exc:
            notes.append(f"{hist}: not an edgeres history ({exc}); skipped")
            continue
        ckpt = read_checkpoint(ckpt_path)
        if not accs or ckpt.model is None:
            notes.append(f"{run}: no test evaluation or no model name recorded; skipped")
            continue
        data = run_data_name(run)
        if data == "synthetic":
            notes.append(f"{run}: trained on synthetic data, not an accuracy; skipped")
            continue
        records.append(RunRecord(ckpt.model, _spec_key(ckpt.pruned), round(100.0 - max(accs), 4), str(run), data))
    if not records:
        notes.append(f"no usable runs under {root}")
    return records, notes


def expected_error(model: str, depth: int, width: int, spec: str | None, dataset: str,
                   runs: list[RunRecord]) -> ExpectedError:
    """From the user's runs (mean of matching runs' best errors), else published, else unknown."""
    mine = [r for r in runs if r.model == model and r.spec == spec]
    if mine:
        err = sum(r.error for r in mine) / len(mine)
        ref = f"{len(mine)} run(s): " + ", ".join(f"{r.path} ({r.data})" for r in mine)
        return ExpectedError(round(err, 4), "runs", ref)
    published = PUBLISHED_ERRORS.get((dataset, depth, width)) if spec is None else None
    if published is not None:
        return ExpectedError(published, "published", WRN_CITATION)
    return ExpectedError(None, "unknown")


# ---------------------------------------------------------------- sizing one candidate


def _build(depth: int, width: int, ratio: float, opts: FitOptions) -> tuple[nn.Module, dict | None]:
    torch.manual_seed(opts.seed)
    net = models.create(f"wrn-{depth}-{width}", num_classes=opts.num_classes, input_size=opts.input_size,
                        dataset=opts.dataset).eval()
    if not ratio:
        return net, None
    from edgeres.compress.prune import prune, pruned_spec

    # Kept channel counts depend on the ratio and rounding only, so a fresh net gives the deployed shapes.
    example = torch.zeros(1, 3, opts.input_size, opts.input_size)
    pruned = prune(net, ratio, example_input=example).model
    pruned.cfg = net.cfg
    spec = pruned_spec(pruned)
    pruned.edgeres_pruned = spec
    return pruned, spec


def roofline(macs: int, batch: int, moved_bytes: int, target: Target, precision: str) -> Latency:
    """max(2 MACs / peak ops, bytes moved / bandwidth) from the profile's figures: an estimate."""
    peak = {"int8": target.peak_int8_tops, "fp16": target.peak_fp16_tflops}.get(precision)
    bw = target.mem_bandwidth_gbs
    if peak is None or bw is None:
        missing = "mem_bandwidth_gbs" if bw is None else f"a {precision} peak"
        return Latency(None, "unknown", f"profile {target.name} has no {missing}")
    compute_s = 2.0 * macs * batch / (peak * 1e12)
    memory_s = moved_bytes / (bw * 1e9)
    unit = "TOPS" if precision == "int8" else "TFLOPS"
    return Latency(
        round(max(compute_s, memory_s) * 1e3, 6), "estimate",
        f"roofline: max(2*MACs / {peak:g} {unit} {precision}, {moved_bytes:,} bytes / {bw:g} GB/s); "
        "no launch overhead or kernel efficiency",
    )


def _calib_batches(opts: FitOptions) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(opts.seed)
    return [torch.randn(16, 3, opts.input_size, opts.input_size, generator=g) for _ in range(2)]


def measure_latency(net: nn.Module, precision: str, batch: int, workdir: Path, target: Target,
                    worker: Worker, opts: FitOptions) -> Latency:
    """p50 latency at `batch` of `net` compiled for `target`'s runtime, timed on this machine (`edgeres.latency`).

    INT8 is calibrated on random inputs: the kernels and their timing do not depend on the values.
    """
    from edgeres.export import export_int8, export_onnx

    backend = get_backend(target.runtime)
    onnx_path = workdir / f"latency-{precision}.onnx"
    if precision == "int8":
        from edgeres.compress import quantize

        example = torch.zeros(1, 3, opts.input_size, opts.input_size)
        qmodel = quantize.ptq(net, _calib_batches(opts), example_input=example)
        export_int8(quantize.strip(qmodel, example), onnx_path, backend, input_size=opts.input_size)
    else:
        export_onnx(net, onnx_path, input_size=opts.input_size)
    artifact = backend.compile(onnx_path, target, onnx_path.with_suffix(backend.suffix))
    options = replace(opts.bench, batch_sizes=(batch,))
    stats = worker.measure(artifact, options, (3, opts.input_size, opts.input_size)).rows[0]
    threads = opts.bench.threads or "default"
    return Latency(stats.p50_ms, "measured", f"{backend.name} on this machine (fresh worker process), p50 of "
                                             f"{stats.runs} runs, batch {batch}, threads {threads}")


def size_candidate(depth: int, width: int, ratio: float, target: Target, precision: str, batch: int,
                   budget_bytes: float, runs: list[RunRecord], opts: FitOptions,
                   worker: Worker) -> tuple[Candidate, nn.Module]:
    """Export, run the liveness pass, count weights, time (or, off the device, estimate) latency, expected error."""
    import onnx

    from edgeres.export import export_onnx
    from edgeres.models.stats import count_macs, count_params

    net, spec = _build(depth, width, ratio, opts)
    with tempfile.TemporaryDirectory(prefix="edgeres-fit-") as tmp:
        onnx_path = export_onnx(net, Path(tmp) / "fp32.onnx", input_size=opts.input_size)
        graph = onnx.load(str(onnx_path))
        act = activation_memory(graph, batch=batch, precision=precision)
        unfused = activation_memory(graph, batch=batch, precision=precision, fuse_conv_add=False)
        weights = weight_bytes(net, precision)
        macs = count_macs(net, opts.input_size)
        fits_memory = weights + act.peak_bytes <= budget_bytes
        if get_backend(target.runtime).runs_on_host:
            latency = measure_latency(net, precision, batch, Path(tmp), target, worker, opts)
        else:
            latency = roofline(macs, batch, weights + act.traffic_bytes, target, precision)
    fits_latency = None
    if opts.latency_ms is not None:
        fits_latency = latency.ms is not None and latency.ms <= opts.latency_ms
    name = net.cfg.name
    cand = Candidate(
        model=name, width=width, prune=ratio, params=count_params(net), macs=macs, weight_bytes=weights,
        activation_bytes=act.peak_bytes, activation_unfused_bytes=unfused.peak_bytes, latency=latency,
        expected_error=expected_error(name, depth, width, _spec_key(spec), opts.dataset, runs),
        fits_memory=fits_memory, fits_latency=fits_latency,
    )
    return cand, net


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class FitReport:
    """Every candidate sized for one target, the pick and why."""

    depth: int
    target: str
    runtime: str
    precision: str
    batch: int
    budget_mb: float
    latency_limit_ms: float | None
    candidates: list[Candidate]
    pick: Candidate | None
    pick_reason: str
    stop_reason: str
    notes: list[str] = field(default_factory=list)
    trained: list[dict] = field(default_factory=list)

    @property
    def title(self) -> str:
        limit = f", latency <= {self.latency_limit_ms:g} ms" if self.latency_limit_ms is not None else ""
        head = (f"WRN-{self.depth}-k on {self.target} ({self.precision}, batch {self.batch}, "
                f"budget {self.budget_mb:g} MiB{limit})")
        if self.pick is None:
            return f"{head}: no pick, {self.pick_reason}"
        return f"{head}: pick {self.pick.label} ({self.pick.total_bytes / MIB:.3f} MiB), {self.pick_reason}"

    @property
    def latency_source(self) -> str:
        sources = {c.latency.source for c in self.candidates}
        return sources.pop() if len(sources) == 1 else "mixed"

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "depth": self.depth, "target": self.target, "runtime": self.runtime, "precision": self.precision,
            "batch": self.batch, "budget_mb": self.budget_mb, "mb_bytes": MIB,
            "latency_limit_ms": self.latency_limit_ms, "latency_source": self.latency_source,
            "candidates": [c.to_dict() for c in self.candidates],
            "pick": self.pick.to_dict() if self.pick else None,
            "pick_reason": self.pick_reason, "stop_reason": self.stop_reason,
            "memory_model": _memory_model(self.precision, self.runtime),
            "published_errors": {"source": WRN_CITATION,
                                 "table": [{"dataset": d, "depth": n, "width": k, "top1_error": e}
                                           for (d, n, k), e in PUBLISHED_ERRORS.items()]},
            "notes": self.notes, "trained": self.trained,
        }

    def table_rows(self) -> tuple[list[str], list[list[Any]]]:
        cols = ["model", "prune", "params", "MACs", "weights MiB", "activations MiB", "total MiB",
                f"latency ms ({self.latency_source})", "exp. err %", "err source", "fits"]
        if any(c.measured_error is not None for c in self.candidates):
            cols.append("trained err %")
        rows = []
        for c in self.candidates:
            fits = "yes" if c.fits else "no (memory)" if not c.fits_memory else "no (latency)"
            if c is self.pick:
                fits += "  <- pick"
            row = [c.model, f"{c.prune:.0%}" if c.prune else "-", c.params, c.macs,
                   round(c.weight_bytes / MIB, 4), round(c.activation_bytes / MIB, 4),
                   round(c.total_bytes / MIB, 4), c.latency.ms, c.expected_error.top1_error,
                   c.expected_error.source, fits]
            if len(cols) > len(row):
                row.append(c.measured_error)
            rows.append(row)
        return cols, rows

    def plot(self, path: str | Path) -> Path:
        """A Pareto plot (PNG): expected error against total memory and against latency, the pick marked."""
        return pareto_plot(self, Path(path))


def _memory_model(precision: str, runtime: str) -> dict:
    acts = {
        "fp32": "4 bytes per element",
        "fp16": "2 bytes per intermediate element; graph input and logits fp32",
        "int8": "1 byte for tensors read only by Conv/Gemm (quantized inputs); other intermediates, the "
                "graph input and logits 4 bytes (no fusion assumed beyond conv+add)",
    }[precision]
    return {
        "weights": "parameters x bytes at the precision; int8: conv/linear weights 1 byte + one fp32 scale per "
                   "output channel, biases and BN (folded scale+shift) fp32",
        "activations": "peak of live activation buffers over the exported ONNX graph's node order at the batch, "
                       "shapes inferred; shape ops alias, element-wise ops reuse a dying input in place, a Conv "
                       f"whose only reader is a residual Add writes into the Add's other input; {acts}",
        "activation_unfused_bytes": "the same without the conv+add fusion (ONNX Runtime without NCHWc kernels)",
        "not_counted": "runtime workspace (im2col, kernel scratch), engine/session overhead, process memory",
        "checked": "fp32 estimate vs ONNX Runtime's measured peak RSS rise (CPU, ORT_ENABLE_ALL) in tests",
        "runtime": runtime,
    }


# ---------------------------------------------------------------- the search


def _resolve(opts: FitOptions) -> tuple[Target, str, int, float]:
    target = targets.load(opts.target)
    precision = opts.precision or target.default_precision
    target.require(precision)
    batch = opts.batch if opts.batch is not None else target.default_batch
    budget = opts.budget_mb if opts.budget_mb is not None else target.memory_mb
    if budget is None:
        raise EdgeresError(f"target {target.name} states no memory_mb; pass --budget-mb")
    if budget <= 0:
        raise EdgeresError(f"--budget-mb must be positive, got {budget}")
    if batch < 1:
        raise EdgeresError(f"--batch must be >= 1, got {batch}")
    if opts.latency_ms is not None and opts.latency_ms <= 0:
        raise EdgeresError(f"--latency-ms must be positive, got {opts.latency_ms}")
    if opts.depth < 10 or (opts.depth - 4) % 6:
        raise EdgeresError(f"--depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {opts.depth}")
    if opts.max_width < 1:
        raise EdgeresError(f"max width must be >= 1, got {opts.max_width}")
    for r in opts.prune:
        if not 0.0 < r < 1.0:
            raise EdgeresError(f"--prune ratios must be fractions in (0, 1), got {r}")
    if opts.plot:
        check_output_file(opts.plot, option="--plot")
    return target, precision, batch, float(budget)


def fit_wrn(opts: FitOptions) -> FitReport:
    """Size WRN-depth-k for k = 1, 2, ... (each with the pruning ratios) until nothing at a width fits."""
    target, precision, batch, budget = _resolve(opts)
    notes: list[str] = []
    runs: list[RunRecord] = []
    if opts.runs:
        runs, run_notes = read_runs(opts.runs)
        notes += run_notes
    ratios = (0.0, *sorted(set(opts.prune)))
    candidates: list[Candidate] = []
    nets: dict[int, nn.Module] = {}
    stop = f"reached the width limit {opts.max_width} with candidates still fitting"
    backend = get_backend(target.runtime)
    with Worker() as worker:
        for width in range(1, opts.max_width + 1):
            row = []
            for ratio in ratios:
                info(f"sizing wrn-{opts.depth}-{width}" + (f" pruned {ratio:.0%}" if ratio else ""))
                cand, net = size_candidate(opts.depth, width, ratio, target, precision, batch, budget * MIB, runs,
                                           opts, worker)
                nets[id(cand)] = net
                row.append(cand)
            candidates += row
            if not any(c.fits_memory for c in row):  # wider nets only need more memory; latency never stops it
                stop = f"nothing at width {width} fits the memory budget"
                break
    chosen, reason = pick(candidates)
    if not backend.runs_on_host:
        notes.append(f"latency is a roofline estimate from the {target.name} profile, not a measurement; "
                     f"bench the engine on the device (`edgeres bench`)")
    if precision == "int8" and backend.runs_on_host:
        notes.append("int8 latency: PTQ on random calibration inputs (kernel timing does not depend on values)")
    if any(c.expected_error.source == "unknown" for c in candidates):
        notes.append("expected error unknown where neither --runs nor the published WRN results cover a candidate")
    report = FitReport(
        depth=opts.depth, target=target.name, runtime=target.runtime, precision=precision, batch=batch,
        budget_mb=budget, latency_limit_ms=opts.latency_ms, candidates=candidates, pick=chosen,
        pick_reason=reason, stop_reason=stop, notes=notes,
    )
    if opts.train and chosen is not None:
        report = train_candidates(report, nets, opts)
    if opts.plot:
        report.plot(opts.plot)
    return report


def train_candidates(report: FitReport, nets: dict[int, nn.Module], opts: FitOptions) -> FitReport:
    """Train the pick (or the Pareto front) with `edgeres.train.train_model`; record the measured error."""
    from edgeres import data
    from edgeres.train import TrainConfig, train_model

    chosen = pareto_front(report.candidates) if opts.train_frontier else [report.pick]
    cfg = opts.train_config or TrainConfig()
    spec = opts.train_data or opts.dataset
    train_ds = data.load_dataset(spec, "train", image_size=opts.input_size)
    test_ds = data.load_dataset(spec, "test", image_size=opts.input_size)
    if train_ds.num_classes != opts.num_classes:
        raise EdgeresError(f"{train_ds.name} has {train_ds.num_classes} classes but the candidates were sized for "
                           f"{opts.num_classes}; pass --num-classes {train_ds.num_classes}")
    if opts.train_subset:
        train_ds = data.subset(train_ds, opts.train_subset, seed=cfg.seed)
    updated: dict[int, Candidate] = {}
    trained = []
    for cand in chosen:
        net = nets[id(cand)]
        out = Path(opts.train_out) / (cand.model + (f"-pruned{round(cand.prune * 100)}" if cand.prune else ""))
        info(f"training {cand.label} -> {out}")
        result = train_model(net.train(), train_ds, test_ds, cfg, out)
        err = round(100.0 - result.best_accuracy, 4)
        updated[id(cand)] = replace(cand, measured_error=err, checkpoint=str(result.checkpoint))
        trained.append({"model": cand.model, "prune": cand.prune, "out": str(out), "epochs": result.epochs,
                        "best_top1_error": err, "final_top1_error": result.final.top1_error,
                        "data": train_ds.name, "synthetic": bool(getattr(train_ds, "synthetic", False))})
    notes = list(report.notes)
    if getattr(train_ds, "synthetic", False):
        notes.append("trained on synthetic data: the measured errors are a smoke test, not an accuracy")
    candidates = [updated.get(id(c), c) for c in report.candidates]
    new_pick = updated.get(id(report.pick), report.pick) if report.pick is not None else None
    return replace(report, candidates=candidates, pick=new_pick, trained=trained, notes=notes)


# ---------------------------------------------------------------- the plot


def pareto_plot(report: FitReport, path: Path) -> Path:
    """Two panels, error against total MiB and against latency: fitting candidates blue, others grey, the
    Pareto front joined, the pick a red star, the budget and latency limit dashed. Candidates whose error
    is unknown sit in a band above the known ones (hollow markers). Written atomically."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from edgeres.io import atomic_write

    def err(c: Candidate) -> float | None:
        return c.measured_error if c.measured_error is not None else c.expected_error.top1_error

    known_errs = [e for c in report.candidates if (e := err(c)) is not None]
    if known_errs:
        lo, hi = min(known_errs), max(known_errs)
        band = hi + max(0.25 * (hi - lo), 0.5)
    else:
        band = 0.5
    front = {id(c) for c in pareto_front(report.candidates)}
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [(f"total memory at batch {report.batch} (MiB)", lambda c: c.total_bytes / MIB, report.budget_mb),
              (f"latency at batch {report.batch} (ms, {report.latency_source})", lambda c: c.latency.ms,
               report.latency_limit_ms)]
    for ax, (xlabel, x_of, limit) in zip(fig.subplots(1, 2), panels, strict=True):
        shown = [c for c in report.candidates if x_of(c) is not None]
        for c in shown:
            e = err(c)
            colour = "tab:blue" if c.fits else "tab:gray"
            ax.scatter([x_of(c)], [band if e is None else e], color=colour if e is not None else "none",
                       edgecolors=colour, s=36)
            ax.annotate(c.label.replace("wrn-", ""), (x_of(c), band if e is None else e), xytext=(4, -11),
                        textcoords="offset points", fontsize=7)
        line = sorted((c for c in shown if id(c) in front and err(c) is not None), key=x_of)
        if len(line) > 1:
            ax.plot([x_of(c) for c in line], [err(c) for c in line], color="tab:blue", lw=1, alpha=0.6,
                    label="Pareto front")
        p = report.pick
        if p is not None and x_of(p) is not None:
            ax.scatter([x_of(p)], [band if err(p) is None else err(p)], marker="*", s=280, color="tab:red",
                       zorder=5, label=f"pick: {p.label}")
        if limit is not None:
            ax.axvline(limit, color="tab:red", ls="--", lw=1, label=f"limit {limit:g}")
        if not shown:
            ax.text(0.5, 0.5, "no figures for this axis", transform=ax.transAxes, ha="center")
        if known_errs:
            ax.axhline(band, color="0.8", ls=":", lw=1)
            ax.annotate("error unknown", (0, band), xycoords=("axes fraction", "data"), xytext=(3, 3),
                        textcoords="offset points", fontsize=7, color="0.4")
            ax.set_ylabel("top-1 error % (expected or trained)")
        else:
            ax.set_ylim(0, 1)
            ax.set_yticks([])
            ax.set_ylabel("top-1 error: unknown for every candidate")
        ax.scatter([], [], color="tab:blue", label="fits")
        ax.scatter([], [], color="tab:gray", label="does not fit")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("\n".join(textwrap.wrap(report.title, 150)), fontsize=8)
    check_output_file(path, option="--plot")
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": "edgeres"})  # how a rerun knows it is ours
    return path
