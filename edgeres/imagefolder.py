"""ImageFolder trees (`root/{train,val}/<class>/<image>`) streamed from disk at their real resolution.

Only file names and labels are held in memory; pixels are decoded batch by batch in DataLoader
worker processes, so memory does not grow with the number of images, and a torchrun rank that is
given a shard reads only its own files. Every image goes through the model's one preprocessing
record (`edgeres.preprocess`): `load_rgb` (any mode or EXIF orientation to RGB), then for evaluation,
calibration and export the shorter-side resize and centre crop, for training the record's augmentation
(torchvision's RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + horizontal flip for 224 px models; the
CIFAR pad-crop-flip is applied per batch by `edgeres.data.batches`).

Class names: a model that has names matches each folder to one of them (or to an alias such as an
ImageNet WordNet id); a folder that is none of its classes is an error naming it. A model without
names takes the sorted folder names.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeres.errors import DataError
from edgeres.preprocess import Preprocess, load_rgb, resize_crop, to_uint8_chw

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff", ".gif"}
SPLIT_DIRS = {"train": ("train",), "test": ("val", "test")}
RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
RRC_RATIO = (3 / 4, 4 / 3)


def default_workers() -> int:
    """DataLoader worker processes: one per core, at most 8 (0 decodes in this process)."""
    return min(8, os.cpu_count() or 1)


@dataclass
class FolderDataset:
    """An ImageFolder split as file paths and labels; pixels are read when batches are drawn."""

    name: str
    split: str
    files: list[str]
    labels: torch.Tensor
    classes: list[str]
    preprocess: Preprocess
    skip_bad: bool = False
    workers: int = field(default_factory=default_workers)
    skipped: list[str] = field(default_factory=list)  # undecodable files met so far (shared by subsets)
    synthetic: bool = False

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.preprocess.input_size

    @property
    def image_shape(self) -> list[int]:
        return [3, self.preprocess.input_size, self.preprocess.input_size]

    def take(self, idx: torch.Tensor) -> FolderDataset:
        """The images at `idx`, sharing this set's record of skipped files."""
        keep = [self.files[i] for i in idx.tolist()]
        return FolderDataset(self.name, self.split, keep, self.labels[idx], self.classes, self.preprocess,
                             self.skip_bad, self.workers, self.skipped)


# ---------------------------------------------------------------- scanning a tree


def split_dir(root: Path, split: str) -> Path:
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    want = " or ".join(f"{root}/{n}/" for n in SPLIT_DIRS[split])
    raise DataError(f"ImageFolder {root} has no {split} split: expected {want} holding <class>/<image files>")


def is_image_folder(root: Path) -> bool:
    return any((root / n).is_dir() for names in SPLIT_DIRS.values() for n in names)


def match_classes(folders: Sequence[str], classes: Sequence[str] | None, aliases: Sequence[str] = ()
                  ) -> tuple[list[str], dict[str, int]]:
    """(the class list, folder -> label). With model `classes`, every folder must be one of them."""
    if classes is None:
        names = sorted(folders)
        return names, {f: i for i, f in enumerate(names)}
    lookup: dict[str, set[int]] = {}
    for i, name in enumerate(classes):
        lookup.setdefault(name, set()).add(i)
    for i, alias in enumerate(aliases):
        lookup.setdefault(alias, set()).add(i)
    mapping = {}
    for folder in folders:
        hits = lookup.get(folder)
        if not hits:
            shown = ", ".join(list(classes)[:5]) + (", ..." if len(classes) > 5 else "")
            raise DataError(f"folder {folder!r} is not one of the model's {len(classes)} classes ({shown}); rename it, "
                            f"or pass --num-classes N to train a new classifier on the folder names")
        if len(hits) > 1:
            ids = [aliases[i] for i in sorted(hits)] if aliases else sorted(hits)
            raise DataError(f"folder {folder!r} names {len(hits)} classes of the model; name it by id instead "
                            f"({', '.join(map(str, ids))})")
        mapping[folder] = hits.pop()
    return list(classes), mapping


def scan(root: Path, split: str, preprocess: Preprocess, *, classes: Sequence[str] | None = None,
         aliases: Sequence[str] = (), skip_bad: bool = False, workers: int | None = None) -> FolderDataset:
    """The files of `root/<split>/<class>/`, labelled by the model's classes (or the folder names)."""
    sub = split_dir(root, split)
    folders = sorted(d.name for d in sub.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"{sub} has no class folders; expected {sub}/<class>/<image files>")
    names, mapping = match_classes(folders, classes, aliases)
    files, labels = [], []
    for folder in folders:
        for f in sorted((sub / folder).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                files.append(str(f))
                labels.append(mapping[folder])
    if not files:
        raise DataError(f"{sub} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FolderDataset(root.name, split, files, torch.tensor(labels, dtype=torch.int64), names, preprocess,
                         skip_bad, default_workers() if workers is None else workers)


# ---------------------------------------------------------------- decoding in workers


def random_resized_crop(img, size: int, rng: random.Random, interpolation: str):
    """torchvision's RandomResizedCrop on a PIL image (same parameter draw), then a 50% horizontal flip."""
    from PIL import Image

    from edgeres.preprocess import _pil_filter

    width, height = img.size
    area = width * height
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            box = (left, top, left + w, top + h)
            break
    if box is None:  # fallback: the whole image's centre at a clamped ratio
        ratio = width / height
        if ratio < RRC_RATIO[0]:
            w, h = width, int(round(width / RRC_RATIO[0]))
        elif ratio > RRC_RATIO[1]:
            w, h = int(round(height * RRC_RATIO[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        box = (left, top, left + w, top + h)
    out = img.resize((size, size), _pil_filter(interpolation), box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


class _Items(torch.utils.data.Dataset):
    """Index -> (uint8 CHW tensor, label, error text); an undecodable file returns its error instead."""

    def __init__(self, ds: FolderDataset, train: bool, seed: int, epoch: int) -> None:
        self.files, self.labels, self.pp = ds.files, ds.labels, ds.preprocess
        self.crop = train and ds.preprocess.train_augment == "random_resized_crop_flip"
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            img = load_rgb(self.files[i])
        except DataError as exc:
            return None, int(self.labels[i]), str(exc)
        if self.crop:
            rng = random.Random(f"{self.seed}/{self.epoch}/{i}")
            img = random_resized_crop(img, self.pp.input_size, rng, self.pp.interpolation)
        else:
            img = resize_crop(img, self.pp)
        return torch.from_numpy(to_uint8_chw(img)), int(self.labels[i]), ""


def _collate(items):
    good = [(x, y) for x, y, err in items if not err]
    bad = [err for _, _, err in items if err]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.int64), bad


def uint8_batches(ds: FolderDataset, order: torch.Tensor, batch_size: int, *, train: bool, seed: int, epoch: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 NCHW, labels) in `order`, decoded by `ds.workers` processes; bad files raise or are skipped."""
    loader = torch.utils.data.DataLoader(
        _Items(ds, train, seed, epoch), batch_size=batch_size, sampler=order.tolist(), num_workers=ds.workers,
        collate_fn=_collate, prefetch_factor=2 if ds.workers else None,
    )
    with _sigchld_restored():
        batches = None
        try:
            batches = iter(loader)
            for x, y, bad in batches:
                if bad:
                    if not ds.skip_bad:
                        raise DataError(f"{bad[0]}; fix or remove it, or pass --skip-bad-images to skip such files")
                    ds.skipped.extend(e for e in bad if e not in ds.skipped)
                if x is not None:
                    yield x, y
        finally:
            del batches  # the workers are joined here, before the SIGCHLD handler is put back


@contextlib.contextmanager
def _sigchld_restored() -> Iterator[None]:
    """Put back the process's SIGCHLD handler once the workers are gone.

    torch's DataLoader installs a process-wide SIGCHLD handler on first use and never removes it; a
    process that later starts other children (an in-process benchmark run after an ImageFolder
    export, say) then died with SIGSEGV. Worker failures are still caught by the DataLoader's own
    status checks while it runs.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGCHLD) if main else None
    try:
        yield
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGCHLD, previous)
