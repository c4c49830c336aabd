"""INT8 under an accuracy budget: per-layer sensitivity through the runtime that ships, then fallback.

The images that decide are a validation slice the final figure is not reported on: by default a
class-balanced slice of the *training* split that calibration did not use, or the test split of
`--val-data`. Every candidate model is built the way the artifact is (raw Q/DQ export, some layers'
Q/DQ removed by `fallback.keep_float`, the target's flavour, FP16 typing for TensorRT), compiled by
the target's backend and run on that slice; a TensorRT bundle, which only the device can build, is
judged by its own ONNX through ONNX Runtime.

Sensitivity is measured leave-one-in-float: the whole model quantized except that one layer. That
is the move the search makes (it keeps layers in float), measured with every other layer's rounding
present, so interactions count; "only this layer quantized" would miss the noise a layer sees from
the others. Top-1 on a slice is coarse (one image is 0.02 pp of 5,000, and many layers tie), so
layers are ranked by the top-1 drop they recover, then by how much closer the logits come to the
float model's (mean squared logit error): the continuous figure breaks ties that top-1 cannot.
The search then keeps the most sensitive layers in float one at a time until the drop is within
the budget, and measures what each step cost (latency, throughput, size) on CPU targets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeres import data
from edgeres.errors import EdgeresError
from edgeres.fallback import Layer, keep_float, quantized_layers, type_fp16
from edgeres.progress import info

DEFAULT_VAL_SIZE = 5000


@dataclass(frozen=True)
class BudgetOptions:
    """`--max-drop PP` and how the images that decide are chosen."""

    max_drop: float  # percentage points of top-1 error against the user's FP32 model
    val_size: int = DEFAULT_VAL_SIZE
    val_data: str | None = None  # a data spec whose test split decides instead of the held-out training slice
    keep_best: bool = False  # out of reach: ship the best reached instead of failing
    cost_runs: int = 50  # timed batch-1 runs per search step (batch 64: a tenth)


@dataclass(frozen=True)
class Judgement:
    """One candidate on the validation slice: top-1 error and its logits' distance to the float model."""

    top1_error: float
    logit_mse: float


@dataclass(frozen=True)
class Sensitivity:
    """A layer's sensitivity: what keeping only it in float recovers."""

    rank: int
    module: str
    node: str
    op: str
    macs: int
    top1_error: float  # validation top-1 error with only this layer in float
    recovered_pp: float  # drop recovered against all-INT8 (pp, > 0 helps)
    logit_mse: float
    logit_mse_recovered: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Step:
    """The model after one more layer went to float, and what it cost against all-INT8."""

    layer: str
    node: str
    sensitivity_pp: float
    val_top1_error: float
    val_drop_pp: float
    latency_ms_p50: float | None
    throughput_ips: float | None
    size_mb: float
    latency_cost_ms: float | None  # this step's cost: against the step before it
    throughput_cost_ips: float | None
    size_cost_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """Builds and judges one mixed-precision variant of a raw Q/DQ ONNX for a target."""

    raw: object  # onnx.ModelProto: the stripped int8 model's export, before any flavour
    flavour: Callable  # the target backend's Q/DQ dialect (backend.flavour)
    fp16_fallback: bool  # TensorRT: float layers typed FP16

    @classmethod
    def for_target(cls, raw, target) -> Candidate:
        """The variants of `raw` a target's runtime gets: its backend's flavour and fallback precision."""
        from edgeres.backends.base import get_backend

        backend = get_backend(target.runtime)
        return cls(raw=raw, flavour=backend.flavour, fp16_fallback=backend.fallback_precision == "fp16")

    def model(self, float_nodes: list[str]):
        built = self.flavour(keep_float(self.raw, float_nodes) if float_nodes else self.raw)
        return type_fp16(built, float_nodes) if self.fp16_fallback and float_nodes else built


def held_out_slice(train_ds: data.Dataset, exclude, size: int, seed: int = 0) -> data.Dataset:
    """A class-balanced slice of the training split that excludes `exclude` (the calibration images)."""
    if size < 1:
        raise EdgeresError(f"--val-size must be >= 1, got {size}")
    idx = data.subset_indices(train_ds, size, seed=seed + 1, exclude=exclude)
    if len(idx) == 0:
        raise EdgeresError("no training image is left for validation after calibration; pass --val-data")
    return train_ds.take(idx)


class Judge:
    """Runs models through one backend on the validation slice; logits compared with a reference."""

    def __init__(self, backend, target, val_ds: data.Dataset, mean, std, workdir: Path, threads: int | None,
                 batch_size: int = 250) -> None:
        self.backend, self.target, self.val, self.workdir = backend, target, val_ds, workdir
        self.mean, self.std, self.threads, self.batch_size = mean, std, threads, batch_size
        self.labels = val_ds.labels.numpy()
        self.reference: np.ndarray | None = None
        self.evaluations = 0
        self.runs_here = True  # False for TensorRT bundles: judged through ONNX Runtime, latency not measured
        self._n = 0

    def compile(self, onnx_model, name: str):
        from edgeres.backends.base import RuntimeOptions
        from edgeres.export import save_onnx

        self._n += 1
        path = save_onnx(onnx_model, self.workdir / f"{name}-{self._n}.onnx")
        out = path.with_name(f"{path.stem}-compiled{self.backend.suffix}")
        artifact = self.backend.compile(path, self.target, out)
        return artifact, self.backend.load(artifact, RuntimeOptions(threads=self.threads))

    def logits(self, session) -> np.ndarray:
        parts = [self.backend.run(session, x.numpy())
                 for x, _ in data.batches(self.val, self.batch_size, mean=self.mean, std=self.std)]
        return np.concatenate(parts)

    def __call__(self, onnx_model, name: str) -> tuple[Judgement, object, object]:
        artifact, session = self.compile(onnx_model, name)
        logits = self.logits(session)
        self.evaluations += 1
        err = round(100.0 * float((logits.argmax(1) != self.labels).mean()), 4)
        mse = float(((logits - self.reference) ** 2).mean()) if self.reference is not None else 0.0
        return Judgement(err, round(mse, 6)), artifact, session


def rank_layers(layers: list[Layer], base: Judgement, judge_one: Callable[[Layer], Judgement]) -> list[Sensitivity]:
    """Leave-one-in-float for every layer; most sensitive first (top-1 recovered, then logit error recovered)."""
    rows = []
    for k, layer in enumerate(layers):
        j = judge_one(layer)
        info(f"sensitivity {k + 1}/{len(layers)} {layer.module}: top-1 err {j.top1_error:.2f} % "
             f"(all-INT8 {base.top1_error:.2f} %)")
        rows.append((layer, j))
    rows.sort(key=lambda lj: (-(base.top1_error - lj[1].top1_error), lj[1].logit_mse))
    return [Sensitivity(rank=i + 1, module=layer.module, node=layer.node, op=layer.op, macs=layer.macs,
                        top1_error=j.top1_error, recovered_pp=round(base.top1_error - j.top1_error, 4),
                        logit_mse=j.logit_mse, logit_mse_recovered=round(base.logit_mse - j.logit_mse, 6))
            for i, (layer, j) in enumerate(rows)]


@dataclass
class SearchResult:
    """What the budget search decided, on which images, and how long it took."""

    max_drop: float
    decided_on: dict
    reference_error: float  # the user's FP32 model on the validation slice
    float_error: float  # the same network with every layer in float (pruned FP32 when pruned)
    int8_error: float  # all-INT8
    ranking: list[Sensitivity] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    met: bool = False
    verdict: str = ""
    search_seconds: float = 0.0
    evaluations: int = 0
    base_cost: dict = field(default_factory=dict)

    @property
    def pruning_cost(self) -> float:
        return round(self.float_error - self.reference_error, 4)

    @property
    def int8_drop(self) -> float:
        return round(self.int8_error - self.reference_error, 4)

    @property
    def best_drop(self) -> float:
        return min([self.int8_drop, *[s.val_drop_pp for s in self.steps]])

    def to_dict(self) -> dict:
        return {
            "max_drop_pp": self.max_drop, "met": self.met, "verdict": self.verdict,
            "decided_on": self.decided_on,
            "validation": {"reference_fp32_error": self.reference_error, "float_error": self.float_error,
                           "all_int8_error": self.int8_error, "all_int8_drop_pp": self.int8_drop,
                           "pruning_cost_pp": self.pruning_cost,
                           "quantization_cost_pp": round(self.int8_error - self.float_error, 4),
                           "best_drop_pp": self.best_drop},
            "sensitivity_measure": "leave-one-in-float through the target's runtime: top-1 drop recovered, "
                                   "then mean squared logit error to the float model recovered",
            "fallback": [s.to_dict() for s in self.steps[: len(self.float_nodes)]],
            "steps": [s.to_dict() for s in self.steps],
            "all_int8_cost": self.base_cost,
            "ranking": [r.to_dict() for r in self.ranking],
            "search_seconds": round(self.search_seconds, 1), "evaluations": self.evaluations,
        }


def _cost(judge: Judge, artifact, session, runs: int) -> dict:
    from edgeres.bench import artifact_bytes
    from edgeres.latency import time_runs

    size = round(artifact_bytes(artifact) / 1e6, 4)
    if not judge.runs_here:
        return {"latency_ms_p50": None, "throughput_ips": None, "size_mb": size}
    shape = tuple(judge.val.images.shape[1:])
    rng = np.random.default_rng(0)
    run = lambda a: judge.backend.run(session, a)  # noqa: E731
    x1 = rng.standard_normal((1, *shape), dtype=np.float32)
    x64 = rng.standard_normal((64, *shape), dtype=np.float32)
    return {"latency_ms_p50": time_runs(run, x1, 5, runs).p50_ms,
            "throughput_ips": time_runs(run, x64, 2, max(runs // 10, 3)).throughput_ips, "size_mb": size}


def search(candidate: Candidate, judge: Judge, *, reference_onnx, float_onnx, options: BudgetOptions,
           decided_on: dict, rank_only: bool = False) -> SearchResult:
    """Measure all-INT8 against the user's FP32 model; if over budget, rank the layers and fall back greedily."""
    t0 = time.perf_counter()
    ref_judgement, _, ref_session = judge(reference_onnx, "reference-fp32")
    judge.reference = judge.logits(ref_session)  # logits of the float network being quantized
    float_error = ref_judgement.top1_error
    if float_onnx is not None:
        float_j, _, float_session = judge(float_onnx, "float")
        judge.reference = judge.logits(float_session)
        float_error = float_j.top1_error
    base, base_artifact, base_session = judge(candidate.model([]), "int8")
    result = SearchResult(max_drop=options.max_drop, decided_on=decided_on, reference_error=ref_judgement.top1_error,
                          float_error=float_error, int8_error=base.top1_error)
    info(f"[bold]INT8 budget[/] {options.max_drop} pp on {decided_on['images']} validation images: FP32 "
         f"{result.reference_error:.2f} %, float {float_error:.2f} %, all-INT8 {base.top1_error:.2f} % "
         f"({result.int8_drop:+.2f} pp)")
    layers = quantized_layers(candidate.raw)
    if rank_only or result.int8_drop > options.max_drop:
        if not rank_only and result.pruning_cost > options.max_drop and not options.keep_best:
            result.verdict = (f"out of reach: pruning alone costs {result.pruning_cost:+.2f} pp on the validation "
                              f"images, over the {options.max_drop} pp budget, so no layer kept in float can meet it")
            result.search_seconds = time.perf_counter() - t0
            result.evaluations = judge.evaluations
            return result
        result.ranking = rank_layers(layers, base, lambda layer: judge(candidate.model([layer.node]),
                                                                         "one-float")[0])
    if rank_only:
        result.search_seconds = time.perf_counter() - t0
        result.evaluations = judge.evaluations
        return result
    result.base_cost = _cost(judge, base_artifact, base_session, options.cost_runs)
    if result.int8_drop <= options.max_drop:
        result.met = True
        result.verdict = f"all-INT8 is within the budget ({result.int8_drop:+.2f} pp <= {options.max_drop} pp)"
    else:
        prev = result.base_cost
        chosen: list[str] = []
        best = (result.int8_drop, [])
        for sens in result.ranking:
            chosen.append(sens.node)
            j, artifact, session = judge(candidate.model(list(chosen)), f"fallback-{len(chosen)}")
            drop = round(j.top1_error - result.reference_error, 4)
            cost = _cost(judge, artifact, session, options.cost_runs)
            result.steps.append(Step(
                layer=sens.module, node=sens.node, sensitivity_pp=sens.recovered_pp, val_top1_error=j.top1_error,
                val_drop_pp=drop, latency_ms_p50=cost["latency_ms_p50"], throughput_ips=cost["throughput_ips"],
                size_mb=cost["size_mb"],
                latency_cost_ms=_delta(cost["latency_ms_p50"], prev["latency_ms_p50"]),
                throughput_cost_ips=_delta(prev["throughput_ips"], cost["throughput_ips"]),
                size_cost_mb=round(cost["size_mb"] - prev["size_mb"], 4)))
            prev = cost
            info(f"fallback {len(chosen)}: {sens.module} in float -> {drop:+.2f} pp (budget {options.max_drop})")
            if drop < best[0]:
                best = (drop, list(chosen))
            if drop <= options.max_drop:
                result.met, result.float_nodes = True, list(chosen)
                result.verdict = (f"within the budget with {len(chosen)} layer(s) in float: {drop:+.2f} pp <= "
                                  f"{options.max_drop} pp on the validation images")
                break
        if not result.met:
            where = (f"pruning alone costs {result.pruning_cost:+.2f} pp" if result.pruning_cost > options.max_drop
                     else "every quantized layer in float still misses it")
            result.verdict = (f"out of reach: the best reached is {best[0]:+.2f} pp on the validation images "
                              f"({len(best[1])} layer(s) in float) against a {options.max_drop} pp budget; {where}")
            result.float_nodes = best[1] if options.keep_best else []
    result.search_seconds = time.perf_counter() - t0
    result.evaluations = judge.evaluations
    return result


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


@dataclass(frozen=True)
class SensitivityReport:
    """`edgeres sensitivity`: the whole ranking, most sensitive first."""

    model: str
    target: str
    result: SearchResult
    random_weights: bool = False  # --random-init: every top-1 figure here means nothing

    @property
    def title(self) -> str:
        r = self.result
        warn = " [random weights: the top-1 figures mean nothing]" if self.random_weights else ""
        return (f"{self.model} -> {self.target}{warn}: INT8 sensitivity, leave-one-in-float through "
                f"{r.decided_on.get('runtime')} on {r.decided_on['images']} validation images (FP32 "
                f"{r.reference_error:.2f} %, all-INT8 {r.int8_error:.2f} %, {r.search_seconds:.0f} s)")

    def to_dict(self) -> dict:
        r = self.result.to_dict()
        return {"model": self.model, "target": self.target, "random_weights": self.random_weights,
                "decided_on": r["decided_on"],
                "validation": r["validation"], "sensitivity_measure": r["sensitivity_measure"],
                "ranking": r["ranking"], "search_seconds": r["search_seconds"], "evaluations": r["evaluations"]}

    def table_rows(self):
        total = sum(s.macs for s in self.result.ranking) or 1
        cols = ["rank", "module (PyTorch)", "ONNX node", "MACs %", "top-1 err % (only it float)",
                "recovered pp", "logit MSE", "MSE recovered"]
        return cols, [[s.rank, s.module, s.node, round(100 * s.macs / total, 2), s.top1_error, s.recovered_pp,
                       s.logit_mse, s.logit_mse_recovered] for s in self.result.ranking]
