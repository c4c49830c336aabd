"""The Python API, one door: a keyword-only function per CLI command, typed arguments in, a result record out.

The option records the commands take (ExportOptions, BenchOptions, FitOptions, TrainConfig) are handed on
from here, so `cli.py` needs this module and `report` alone.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgeres import data, models
from edgeres.budget import BudgetOptions as BudgetOptions  # re-exported: the CLI builds its options here
from edgeres.checkpoint import load_model, require_weights, untrained
from edgeres.evaluate import EvalResult, evaluate
from edgeres.fit import FitOptions, FitReport
from edgeres.latency import BenchOptions
from edgeres.models.stats import count_macs, count_params
from edgeres.pipeline import ExportOptions
from edgeres.report import RANDOM_WEIGHTS, ExportReport
from edgeres.train import SCHEDULES, TrainConfig, recipe

if TYPE_CHECKING:
    from edgeres.bench import BenchResult
    from edgeres.budget import SensitivityReport
    from edgeres.train import TrainResult

__all__ = ["SCHEDULES", "BenchOptions", "ExportOptions", "FitOptions", "TrainConfig"]  # records the CLI builds

WRN_EXAMPLES = ("wrn-16-4", "wrn-16-8", "wrn-28-10", "wrn-40-4")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    params: int
    macs: int
    input_size: int
    num_classes: int


@dataclass(frozen=True)
class ModelList:
    models: list[ModelInfo]
    title: str = "Models (params and MACs at the default input size; wrn-D-K takes any D=6n+4, K>=1)"

    def to_dict(self) -> list[dict]:
        return [asdict(m) for m in self.models]

    def table_rows(self):
        cols = ["model", "family", "params", "MACs", "input", "classes"]
        rows = [[m.name, m.family, m.params, m.macs, f"{m.input_size}x{m.input_size}", m.num_classes]
                for m in self.models]
        return cols, rows


def list_models(pattern: str = "*") -> ModelList:
    """Every registered model (and common WRN sizes) with params and MACs."""
    names = [n for n in models.list_models() if n != "wrn-D-K"] + list(WRN_EXAMPLES)
    import torch

    infos = []
    for name in fnmatch.filter(names, pattern):
        with torch.device("meta"):  # shapes only: no memory or init time for wide_resnet101_2's 127M weights
            m = models.create(name)
        infos.append(ModelInfo(name, m.cfg.family, count_params(m), count_macs(m), m.cfg.input_size,
                               m.cfg.num_classes))
    return ModelList(infos)


@dataclass(frozen=True)
class EvalReport:
    model: str
    weights: str | None
    data: str
    split: str
    result: EvalResult
    runtime: str = "pytorch"
    skipped_images: int = 0  # undecodable files left out under --skip-bad-images

    @property
    def title(self) -> str:
        skipped = f", {self.skipped_images} undecodable images skipped" if self.skipped_images else ""
        return f"{self.model} on {self.data} ({self.split}, {self.runtime}{skipped})"

    def to_dict(self) -> dict:
        return {"model": self.model, "weights": self.weights, "data": self.data, "split": self.split,
                "runtime": self.runtime, **self.result.to_dict(), "skipped_images": self.skipped_images}

    def table_rows(self):
        r = self.result
        cols = ["model", "top-1 acc %", "top-1 err %", "correct", "total"]
        row = [self.model, r.top1_accuracy, r.top1_error, r.correct, r.total]
        if self.weights == RANDOM_WEIGHTS:
            cols = ["model", "weights", *cols[1:]]
            row = [self.model, RANDOM_WEIGHTS, "n/a (random weights)", "n/a (random weights)", r.correct, r.total]
        if self.skipped_images:
            cols, row = cols + ["skipped"], row + [self.skipped_images]
        return cols, [row]


def eval_model(
    model: str | None,
    *,
    weights: str | os.PathLike | None = None,
    data_spec: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    num_classes: int | None = None,
    limit: int | None = None,
    random_init: bool = False,
    skip_bad_images: bool = False,
    **arch,
) -> EvalReport:
    """Top-1 of a PyTorch model (name + weights) on a data split; artifact files go through their runtime.

    A model without weights is an error unless `random_init` (then the report says its error means nothing).
    """
    from edgeres.backends.base import artifact_suffixes

    if model and Path(model).suffix.lower() in artifact_suffixes() and weights is None:
        return eval_artifact(model, data_spec=data_spec, split=split, batch_size=batch_size, limit=limit)
    net = load_model(model, weights, num_classes=num_classes, new_head=False, **arch)
    random = require_weights(model, weights, random_init) or untrained(net)  # after the name is checked
    ds = data.for_model(net.cfg, data_spec, split, skip_bad_images=skip_bad_images)
    data.check_classes(ds, net.cfg.num_classes, net.cfg.name,
                       fix=f"fine-tune it for {ds.num_classes} classes first (edgeres train ... --num-classes "
                           f"{ds.num_classes}) or pass data with {net.cfg.num_classes} classes")
    if limit:
        ds = data.subset(ds, limit)
    result = evaluate(
        net, data.batches(ds, batch_size, mean=net.cfg.mean, std=net.cfg.std),
        total=data.num_batches(ds, batch_size), desc=f"eval {net.cfg.name}",
    )
    name = "synthetic (smoke test, not an accuracy)" if ds.synthetic else ds.name
    return EvalReport(net.cfg.name, RANDOM_WEIGHTS if random else str(weights) if weights else model, name, split,
                      result, skipped_images=len(ds.skipped))


def train_recipe(model: str, weights: str | os.PathLike | None, **given) -> TrainConfig:
    """The paper recipe from scratch, the fine-tuning one from pretrained weights (MODEL.TAG or --weights);
    options given (not None) override either."""
    pretrained = weights is not None or models.split_name(model)[1] is not None
    return recipe(pretrained=pretrained, **given)


@dataclass(frozen=True)
class TrainReport:
    model: str
    data: str
    out: str
    result: TrainResult
    title: str = "Training"

    classes: list[str] | None = None
    skipped_images: int = 0

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "out": self.out, **self.result.to_dict(),
                "classes": self.classes, "skipped_images": self.skipped_images}

    def table_rows(self):
        r = self.result
        return (["model", "epochs", "top-1 acc %", "top-1 err %", "best acc %", "checkpoint"],
                [[self.model, r.epochs, r.final.top1_accuracy, r.final.top1_error, r.best_accuracy,
                  str(r.checkpoint)]])


def train(
    model: str,
    *,
    data_spec: str | None,
    out: str | os.PathLike,
    config: TrainConfig,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    resume: bool = False,
    subset: int | None = None,
    skip_bad_images: bool = False,
    **arch,
) -> TrainReport:
    """Train (or fine-tune from `weights` or a weights tag) a model on a data set.

    Class names travel with the model: an ImageFolder's folders are matched to the model's names, or
    become its names when it has none (a new head from --num-classes, or a model built from scratch).
    """
    import torch

    from edgeres.train import check_run_folder, train_model

    check_run_folder(out)  # a user's own folder is refused before any work
    torch.manual_seed(config.seed)  # reproducible initial weights
    net = load_model(model, weights, num_classes=num_classes, **arch)
    train_ds = data.for_model(net.cfg, data_spec, "train", skip_bad_images=skip_bad_images)
    pretrained = weights is not None or models.split_name(model)[1] is not None
    if not pretrained and num_classes is None and train_ds.num_classes != net.cfg.num_classes:
        net = load_model(model, None, num_classes=train_ds.num_classes, **arch)
    fix = f"pass --num-classes {train_ds.num_classes} (a new classifier, fine-tuned) or data with " \
          f"{net.cfg.num_classes} classes"
    data.check_classes(train_ds, net.cfg.num_classes, net.cfg.name, fix=fix)
    if net.cfg.classes is None and not train_ds.synthetic:
        net.cfg = replace(net.cfg, classes=tuple(train_ds.classes))  # folder (or CIFAR) names travel with it
    test_ds = data.for_model(net.cfg, data_spec, "test", skip_bad_images=skip_bad_images)
    data.check_classes(test_ds, net.cfg.num_classes, net.cfg.name, fix=fix)
    if subset:
        train_ds = data.subset(train_ds, subset, seed=config.seed)
    result = train_model(net, train_ds, test_ds, config, Path(out), resume=resume)
    skipped = len(set(train_ds.skipped) | set(test_ds.skipped))
    return TrainReport(net.cfg.name, train_ds.name, str(out), result,
                       classes=list(net.cfg.classes) if net.cfg.classes else None, skipped_images=skipped)


@dataclass(frozen=True)
class TargetList:
    targets: list  # edgeres.targets.Target
    title: str = "Targets (targets/*.toml)"

    def to_dict(self) -> list[dict]:
        return [t.to_dict() for t in self.targets]

    def table_rows(self):
        cols = ["target", "runtime", "precisions", "memory MB", "CC", "DLA", "TensorRT", "INT8 TOPS", "GB/s"]
        rows = [[t.name + (f" ({', '.join(t.aliases)})" if t.aliases else ""), t.runtime, ",".join(t.precisions),
                 t.memory_mb, t.compute_capability, t.dla_cores,
                 f"{t.tensorrt.min}-{t.tensorrt.max}" if t.tensorrt else None, t.peak_int8_tops, t.mem_bandwidth_gbs]
                for t in self.targets]
        return cols, rows


def list_targets() -> TargetList:
    from edgeres import targets

    return TargetList(targets.list_targets())


@dataclass(frozen=True)
class LintReport:
    onnx: str
    target: str
    report: object  # edgeres.check.CheckReport

    @property
    def title(self) -> str:
        verdict = "passes" if self.report.ok else f"fails ({len(self.report.errors)} errors)"
        return f"TensorRT lint of {self.onnx} for {self.target}: {verdict}, {len(self.report.warnings)} warnings"

    def to_dict(self) -> dict:
        return {"onnx": self.onnx, "target": self.target, **self.report.to_dict()}

    def table_rows(self):
        return (["severity", "rule", "node", "message"],
                [[f.severity, f.rule, f.node, f.message] for f in self.report.findings])


def check(onnx_path: str | os.PathLike, target: str) -> LintReport:
    """Every construct in the ONNX that TensorRT on `target` rejects (error) or runs slowly (warning)."""
    from edgeres import targets
    from edgeres.check import check_onnx

    t = targets.load(target)
    return LintReport(str(onnx_path), t.name, check_onnx(onnx_path, t))


def eval_artifact(
    path: str | os.PathLike, *, data_spec: str | None = None, split: str = "test", batch_size: int = 256,
    limit: int | None = None,
) -> EvalReport:
    """Top-1 of a compiled artifact (model.onnx, model.engine, IR .xml) through its own runtime.

    Preprocessing, class names and the default data set come from the artifact's own metadata, so a
    model.onnx copied away from its export folder gives the figure the export reported.
    """
    from edgeres import artifact_meta
    from edgeres.backends.base import get_backend, open_artifact
    from edgeres.errors import DataError
    from edgeres.evaluate import evaluate_session

    artifact = open_artifact(path)
    meta = artifact_meta.read(path)
    pp = meta.preprocess
    spec = data_spec or meta.dataset
    if spec is None:
        raise DataError(f"{Path(path).name} does not name its data set; pass --data")
    ds = data.load_dataset(spec, split, image_size=pp.input_size, preprocess=pp,
                           classes=tuple(meta.classes) if meta.classes is not None else None)
    data.check_classes(ds, meta.num_classes, Path(path).name, fix=f"pass data with {meta.num_classes} classes")
    if not ds.synthetic and meta.classes is not None and list(meta.classes) != list(ds.classes):
        raise DataError(f"the classes of {ds.name} ({', '.join(ds.classes[:4])}, ...) are not those of "
                        f"{Path(path).name} ({', '.join(meta.classes[:4])}, ...) in order; pass the data set it "
                        "was trained for")
    if limit:
        ds = data.subset(ds, limit)
    backend = get_backend(artifact.runtime)
    session = backend.load(artifact)
    result = evaluate_session(backend, session, ds, mean=pp.mean, std=pp.std, batch_size=batch_size,
                              desc=f"eval {Path(path).name}")
    name = "synthetic (smoke test, not an accuracy)" if ds.synthetic else ds.name
    random = bool(meta.weights.get("random_init"))
    return EvalReport(meta.model, RANDOM_WEIGHTS if random else str(path), name, split, result,
                      runtime=artifact.runtime)


@dataclass(frozen=True)
class Prediction:
    """One image's top-k classes: (output index, class name, probability), most probable first."""

    image: str
    top: list[tuple[int, str, float]]

    def to_dict(self) -> dict:
        return {"image": self.image,
                "top": [{"index": i, "class": c, "probability": p} for i, c, p in self.top]}


@dataclass(frozen=True)
class PredictReport:
    artifact: str
    runtime: str
    precision: str
    model: str
    predictions: list[Prediction]

    @property
    def title(self) -> str:
        return f"{Path(self.artifact).name} ({self.model}, {self.runtime} {self.precision})"

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "runtime": self.runtime, "precision": self.precision, "model": self.model,
                "predictions": [p.to_dict() for p in self.predictions]}

    def table_rows(self):
        rows = [[p.image if rank == 1 else "", rank, name, index, f"{prob:.4f}"]
                for p in self.predictions for rank, (index, name, prob) in enumerate(p.top, 1)]
        return ["image", "rank", "class", "index", "probability"], rows


def softmax(logits):
    """Probabilities from one row of logits, in float64 (what `predict` and its consumers print)."""
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def predict(path: str | os.PathLike, images: list[str | os.PathLike], *, top_k: int = 5) -> PredictReport:
    """Top-k class names with probabilities for each image, through the artifact's own runtime.

    Each image is prepared by edgeres.preprocess from the artifact's own metadata and run alone (batch 1).
    """
    import numpy as np

    from edgeres import artifact_meta
    from edgeres.backends.base import get_backend, open_artifact
    from edgeres.errors import EdgeresError
    from edgeres.preprocess import eval_array

    if top_k < 1:
        raise EdgeresError(f"--top must be >= 1, got {top_k}")
    if not images:
        raise EdgeresError("no images given; pass one or more image files")
    artifact = open_artifact(path)
    meta = artifact_meta.read(path)
    arrays = [eval_array(Path(img), meta.preprocess) for img in images]  # every image decodes before any run
    backend = get_backend(artifact.runtime)
    session = backend.load(artifact)
    predictions = []
    for img, x in zip(images, arrays, strict=True):
        logits = np.asarray(backend.run(session, x[None]))[0]
        if logits.shape != (meta.num_classes,):
            raise EdgeresError(f"{Path(path).name} gave {logits.shape} outputs, its metadata says "
                               f"{meta.num_classes} classes; re-export it")
        probs = softmax(logits)
        order = np.argsort(-probs, kind="stable")[:top_k]
        predictions.append(Prediction(str(img), [(int(i), meta.class_name(int(i)), float(probs[i])) for i in order]))
    return PredictReport(str(path), artifact.runtime, artifact.precision, meta.model, predictions)


def export(
    model: str | None,
    *,
    weights: str | os.PathLike | None = None,
    data_spec: str | None = None,
    out: str | os.PathLike | None = None,
    num_classes: int | None = None,
    options: ExportOptions = ExportOptions(),
    **arch,
) -> ExportReport:
    """Export `model` for `options.target`: each variant's size, latency and top-1 error, written to `out`."""
    from edgeres import pipeline

    return pipeline.export(model, weights=weights, data_spec=data_spec, out=out, num_classes=num_classes,
                           options=options, **arch)


def sensitivity(
    model: str | None,
    *,
    weights: str | os.PathLike | None = None,
    data_spec: str | None = None,
    num_classes: int | None = None,
    options: ExportOptions = ExportOptions(int8=True),
    **arch,
) -> SensitivityReport:
    """Every quantized layer of `model` ranked by INT8 sensitivity through `options.target`'s runtime."""
    from edgeres import pipeline

    return pipeline.sensitivity(model, weights=weights, data_spec=data_spec, num_classes=num_classes,
                                options=options, **arch)


def bench(artifact: str | os.PathLike, *, options: BenchOptions = BenchOptions()) -> BenchResult:
    """Latency percentiles, throughput and peak memory of an artifact, measured in a fresh worker process."""
    from edgeres.bench import bench_path

    return bench_path(artifact, options)


def fit(*, options: FitOptions) -> FitReport:
    """Every WRN-D-k (and pruning ratio) sized for a target, and the pick."""
    from edgeres.fit import fit_wrn

    return fit_wrn(options)


@dataclass(frozen=True)
class BuildReport:
    """The engine `edgeres build` made or reused, and the device it was built for."""

    engine: str
    meta: dict

    @property
    def title(self) -> str:
        m = self.meta
        return (f"{self.engine}: TensorRT {m.get('tensorrt_version')} on {m.get('gpu_name')} "
                f"(CC {m.get('compute_capability')})")

    def to_dict(self) -> dict:
        return {"engine": self.engine, **self.meta}

    def table_rows(self):
        keys = ("precision", "tensorrt_version", "gpu_name", "compute_capability", "dla_core")
        return ["engine", *keys], [[Path(self.engine).name, *(self.meta.get(k) for k in keys)]]


def build(bundle: str | os.PathLike, *, dla_core: int | None = None) -> BuildReport:
    """On the device: build (or reuse, when its fingerprint matches) the TensorRT engine of an export bundle."""
    from edgeres.backends.tensorrt import ensure_engine, read_engine_meta

    engine = ensure_engine(bundle, dla_core=dla_core)
    return BuildReport(str(engine), read_engine_meta(engine) or {})
