"""One door for model names, like timm: `create("wrn-16-4", num_classes=10)`.

A name may carry a weights tag after a dot (`resnet20.cifar10_akamaster`); the tag is resolved by
`edgeres.checkpoint`, not here. Parametric families (`wrn-D-K`) register a pattern and a parser.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from edgeres.errors import ModelError
from edgeres.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess


@dataclass(frozen=True)
class ModelCfg:
    """A builder's defaults: what data and export read from `model.cfg`."""

    name: str
    family: str
    num_classes: int = 10
    input_size: int = 32
    dataset: str = "cifar10"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    arch: dict = field(default_factory=dict)  # options beyond the name that rebuild the model
    classes: tuple[str, ...] | None = None  # class names in output order, when known
    preprocess: Preprocess | None = None  # None: derived from input_size, mean and std
    weights: str | None = None  # where the weights came from: a tag (resnet18.imagenet1k_v1), URL or file

    def __post_init__(self) -> None:
        if self.preprocess is None:
            pp = (
                Preprocess.cifar(self.input_size, self.mean, self.std)
                if self.input_size < 64
                else Preprocess.imagenet(self.input_size, resize=round(self.input_size * 256 / 224))
            )
            object.__setattr__(self, "preprocess", pp)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "dataset": self.dataset,
            "mean": list(self.mean),
            "std": list(self.std),
            "arch": dict(self.arch),
            "classes": list(self.classes) if self.classes is not None else None,
            "preprocess": self.preprocess.to_dict(),
            "weights": self.weights,
        }


Builder = Callable[..., nn.Module]
_MODELS: dict[str, Builder] = {}
_PATTERNS: list[tuple[re.Pattern, str, Callable[[re.Match], dict], Builder]] = []


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under a fixed name."""

    def deco(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def register_pattern(regex: str, example: str, parse: Callable[[re.Match], dict]) -> Callable[[Builder], Builder]:
    """Register a parametric family: names matching `regex` call the builder with `parse(match)`."""

    def deco(fn: Builder) -> Builder:
        _PATTERNS.append((re.compile(regex), example, parse, fn))
        return fn

    return deco


def split_name(name: str) -> tuple[str, str | None]:
    """`resnet20.cifar10_akamaster` -> ("resnet20", "cifar10_akamaster")."""
    base, _, tag = name.partition(".")
    return base.lower(), (tag or None)


def _resolve(base: str) -> tuple[Builder, dict]:
    if base in _MODELS:
        return _MODELS[base], {}
    for regex, _example, parse, fn in _PATTERNS:
        m = regex.fullmatch(base)
        if m:
            return fn, parse(m)
    known = ", ".join(list_models())
    raise ModelError(f"unknown model {base!r}; known models: {known}")


def create(name: str, **kwargs) -> nn.Module:
    """Build a model by name. Options whose value is None are dropped so builder defaults win."""
    base, _tag = split_name(name)
    fn, parsed = _resolve(base)
    opts = {**parsed, **{k: v for k, v in kwargs.items() if v is not None}}
    try:
        return fn(**opts)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        bad = str(exc).split("argument")[-1].strip(" '\"")
        raise ModelError(f"model {base!r} does not take the option {bad!r}") from exc


def is_known(name: str) -> bool:
    try:
        _resolve(split_name(name)[0])
    except ModelError:
        return False
    return True


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell pattern, plus one example per parametric family."""
    names = list(_MODELS) + [example for _, example, _, _ in _PATTERNS]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]
