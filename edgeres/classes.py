"""Class-name lists shipped with the package: ImageNet-1k (index order, with WordNet ids) and CIFAR-10."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from functools import cache
from importlib import resources

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@cache
def imagenet1k() -> tuple[tuple[str, str], ...]:
    """The 1,000 ImageNet-1k classes in index order (sorted WordNet ids) as (wnid, name)."""
    text = resources.files("edgeres.resources").joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))[1:]
    return tuple((wnid, name) for _index, wnid, name in rows)


def imagenet1k_names() -> tuple[str, ...]:
    return tuple(name for _wnid, name in imagenet1k())


def aliases(classes: Sequence[str] | None) -> tuple[str, ...]:
    """Other names data folders may use for `classes`: ImageNet's WordNet ids (n01440764 = tench)."""
    if classes is not None and tuple(classes) == imagenet1k_names():
        return tuple(wnid for wnid, _name in imagenet1k())
    return ()
