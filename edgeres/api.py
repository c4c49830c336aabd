"""The Python API behind each CLI command: typed arguments in, result dataclasses out."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeres import data, models
from edgeres.checkpoint import load_model
from edgeres.models.stats import count_macs, count_params
from edgeres.train import EvalResult, evaluate

if TYPE_CHECKING:
    from edgeres.train import TrainConfig, TrainResult

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
    infos = []
    for name in fnmatch.filter(names, pattern):
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

    @property
    def title(self) -> str:
        return f"{self.model} on {self.data} ({self.split}, {self.runtime})"

    def to_dict(self) -> dict:
        return {"model": self.model, "weights": self.weights, "data": self.data, "split": self.split,
                "runtime": self.runtime, **self.result.to_dict()}

    def table_rows(self):
        r = self.result
        return (["model", "top-1 acc %", "top-1 err %", "correct", "total"],
                [[self.model, r.top1_accuracy, r.top1_error, r.correct, r.total]])


def eval_model(
    model: str | None,
    *,
    weights: str | os.PathLike | None = None,
    data_spec: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    num_classes: int | None = None,
    limit: int | None = None,
    **arch,
) -> EvalReport:
    """Top-1 of a PyTorch model (name + weights) on a data split."""
    net = load_model(model, weights, num_classes=num_classes, **arch)
    ds = data.load_dataset(data_spec or net.cfg.dataset, split, image_size=net.cfg.input_size)
    if limit:
        ds = data.subset(ds, limit)
    result = evaluate(
        net, data.batches(ds, batch_size, mean=net.cfg.mean, std=net.cfg.std),
        total=data.num_batches(ds, batch_size), desc=f"eval {net.cfg.name}",
    )
    name = "synthetic (smoke test, not an accuracy)" if ds.synthetic else ds.name
    return EvalReport(net.cfg.name, str(weights) if weights else model, name, split, result)


@dataclass(frozen=True)
class TrainReport:
    model: str
    data: str
    out: str
    result: TrainResult
    title: str = "Training"

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "out": self.out, **self.result.to_dict()}

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
    **arch,
) -> TrainReport:
    """Train (or fine-tune from `weights`) a model with the paper recipe."""
    import torch

    from edgeres.train import train_model

    torch.manual_seed(config.seed)  # reproducible initial weights
    net = load_model(model, weights, num_classes=num_classes, **arch)
    spec = data_spec or net.cfg.dataset
    train_ds = data.load_dataset(spec, "train", image_size=net.cfg.input_size)
    test_ds = data.load_dataset(spec, "test", image_size=net.cfg.input_size)
    if weights is None and num_classes is None and train_ds.num_classes != net.cfg.num_classes:
        net = load_model(model, None, num_classes=train_ds.num_classes, **arch)
    if subset:
        train_ds = data.subset(train_ds, subset, seed=config.seed)
    result = train_model(net, train_ds, test_ds, config, Path(out), resume=resume)
    return TrainReport(net.cfg.name, train_ds.name, str(out), result)
