"""Data sets: CIFAR-10/100 (official python format, md5-verified), ImageFolder trees, synthetic.

CIFAR and synthetic sets are held in memory as uint8 NCHW tensors; ImageFolder trees stream from
disk (`edgeres.imagefolder`) through the model's preprocessing record. `batches` does augmentation
and the normalisation stored in `model.cfg` for both, so every stage preprocesses identically.

Where data is found, in order: an explicit path or name (`--data`), `$EDGERES_DATA`, the user
cache (`$XDG_CACHE_HOME/edgeres` or `~/.cache/edgeres`), a checksummed download into that cache
(only where a network exists and `$EDGERES_NO_DOWNLOAD` is unset), else one error naming all of these.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from edgeres import classes as class_lists
from edgeres import imagefolder
from edgeres.errors import DataError
from edgeres.imagefolder import FolderDataset
from edgeres.io import atomic_write, md5sum
from edgeres.preprocess import Preprocess

if TYPE_CHECKING:
    from edgeres.models.registry import ModelCfg


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant lives and what its official files hash to (torchvision's list)."""

    name: str
    folder: str
    train_files: tuple[tuple[str, str], ...]
    test_files: tuple[tuple[str, str], ...]
    meta: tuple[str, str]
    label_key: bytes
    names_key: bytes
    url: str
    tar_md5: str


CIFAR = {
    "cifar10": CifarSpec(
        name="cifar10",
        folder="cifar-10-batches-py",
        train_files=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test_files=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        label_key=b"labels",
        names_key=b"label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        tar_md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        folder="cifar-100-python",
        train_files=(("train", "16019d7e3df5f24257cddd4c6b4e7ff4"),),
        test_files=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        tar_md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
SPLITS = ("train", "test")


@dataclass
class Dataset:
    """Images as uint8 [N, 3, H, W], labels as int64 [N]."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    synthetic: bool = False
    skipped: list[str] = field(default_factory=list)  # always empty: in-memory sets hold decoded images

    def __len__(self) -> int:
        return int(self.labels.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_shape(self) -> list[int]:
        return list(self.images.shape[1:])

    def take(self, idx: torch.Tensor) -> Dataset:
        return Dataset(self.name, self.split, self.images[idx], self.labels[idx], self.classes, self.synthetic)


AnyDataset = Dataset | FolderDataset


# ---------------------------------------------------------------- locating data


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeres"


def _search_roots() -> list[tuple[str, Path]]:
    roots = []
    if env := os.environ.get("EDGERES_DATA"):
        roots.append(("EDGERES_DATA", Path(env).expanduser()))
    roots.append(("user cache", cache_dir()))
    return roots


def data_roots() -> list[Path]:
    """The folders searched for named data sets and pretrained weights, in order."""
    return [p for _, p in _search_roots()]


def _not_found(name: str) -> DataError:
    looked = "; ".join(f"{label} {p}" for label, p in _search_roots())
    return DataError(
        f"no {name} data found (looked in: {looked}; download disabled or no network); "
        f"pass --data PATH, set EDGERES_DATA, or place it in {cache_dir()}"
    )


def _find_cifar_dir(spec: CifarSpec, root: Path) -> Path | None:
    for cand in (root / spec.folder, root):
        if (cand / spec.meta[0]).is_file() and cand.name == spec.folder:
            return cand
    return None


def _download_cifar(spec: CifarSpec) -> Path | None:
    """Fetch the official tarball into the cache, check its md5, extract safely. None without network."""
    if os.environ.get("EDGERES_NO_DOWNLOAD"):
        return None
    dest = cache_dir()
    tar_path = dest / Path(spec.url).name
    try:
        with urllib.request.urlopen(spec.url, timeout=30) as resp, atomic_write(tar_path) as tmp:
            tmp.write_bytes(resp.read())
    except OSError:
        return None
    if md5sum(tar_path) != spec.tar_md5:  # verify the checksum before extracting anything
        tar_path.unlink(missing_ok=True)
        raise DataError(f"downloaded {tar_path.name} has the wrong md5; retry, or pass --data PATH")
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    return dest / spec.folder


def resolve_cifar(spec: CifarSpec, path: Path | None = None) -> Path:
    if path is not None:
        found = _find_cifar_dir(spec, path)
        if found is None:
            raise DataError(f"{path} holds no {spec.folder}/ folder; pass the folder that contains it")
        return found
    for _, root in _search_roots():
        if found := _find_cifar_dir(spec, root):
            return found
    if found := _download_cifar(spec):
        return found
    raise _not_found(spec.name)


# ---------------------------------------------------------------- reading CIFAR safely


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only the numpy array types CIFAR files contain; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _verify(path: Path, md5: str) -> None:
    if not path.is_file():
        raise DataError(f"missing data file {path}; the data set folder is incomplete")
    if md5sum(path) != md5:
        raise DataError(f"{path} fails its md5 check (corrupt or modified); replace it with the official file")


def _unpickle(path: Path) -> dict:
    try:
        return _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # md5 matched, so this means an unexpected file format
        raise DataError(f"cannot read {path}: {exc}") from exc


def load_cifar(spec: CifarSpec, split: str, path: Path | None = None) -> Dataset:
    folder = resolve_cifar(spec, path)
    files = spec.train_files if split == "train" else spec.test_files
    for fname, md5 in (spec.meta, *files):  # every checksum before any unpickling
        _verify(folder / fname, md5)
    classes = [c.decode() for c in _unpickle(folder / spec.meta[0])[spec.names_key]]
    images, labels = [], []
    for fname, _ in files:
        entry = _unpickle(folder / fname)
        images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[spec.label_key], dtype=np.int64))
    return Dataset(
        name=spec.name,
        split=split,
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=classes,
    )


# ---------------------------------------------------------------- ImageFolder and synthetic


def synthetic(n: int = 256, num_classes: int = 10, size: int = 32, seed: int = 0, split: str = "train") -> Dataset:
    """Random learnable images (class-dependent colour shifts) for smoke tests; never an accuracy."""
    g = torch.Generator().manual_seed(seed + (0 if split == "train" else 1))
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    base = torch.rand(num_classes, 3, 1, 1, generator=g) * 160 + 40
    noise = torch.randn(n, 3, size, size, generator=g) * 30
    images = (base[labels] + noise).clamp(0, 255).to(torch.uint8)
    return Dataset("synthetic", split, images, labels, [f"class{i}" for i in range(num_classes)], synthetic=True)


def for_model(cfg: ModelCfg, spec: str | os.PathLike | None, split: str, *, skip_bad_images: bool = False,
              workers: int | None = None) -> AnyDataset:
    """`spec` (default: the model's data set) read through the model's preprocessing record and, for an
    ImageFolder tree, labelled by the model's class names (or, when it has none, by the folder names)."""
    return load_dataset(spec or cfg.dataset, split, image_size=cfg.input_size, preprocess=cfg.preprocess,
                        classes=cfg.classes, skip_bad_images=skip_bad_images, workers=workers)


def load_dataset(
    spec: str | os.PathLike | None,
    split: str,
    *,
    image_size: int = 32,
    preprocess: Preprocess | None = None,
    classes: Sequence[str] | None = None,
    class_aliases: Sequence[str] = (),
    skip_bad_images: bool = False,
    workers: int | None = None,
) -> AnyDataset:
    """Load a data set by name (cifar10, cifar100, synthetic) or path (CIFAR folder or ImageFolder tree).

    An ImageFolder tree is read through `preprocess` (the model's record; default: derived from
    `image_size` as ModelCfg does) and labelled by `classes` when the model has names.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if spec is None:
        raise DataError("no data set given; pass --data cifar10|cifar100|PATH")
    text = str(spec)
    if text == "imagefolder":  # a 224 px model's default: its data has to be named
        raise DataError("this model reads an ImageFolder tree; pass --data FOLDER (FOLDER/train/<class>/..., "
                        "FOLDER/val/<class>/...)")
    if text.lower() in CIFAR:
        return load_cifar(CIFAR[text.lower()], split)
    if text.lower() == "synthetic":
        return synthetic(n=512 if split == "train" else 256, size=image_size, split=split)
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(
            f"data {text!r} is neither a known data set (cifar10, cifar100, synthetic) nor an existing path"
        )
    for cifar in CIFAR.values():
        if _find_cifar_dir(cifar, path):
            return load_cifar(cifar, split, path)
    if imagefolder.is_image_folder(path):
        if class_aliases == () and classes is not None:
            class_aliases = class_lists.aliases(classes)
        if preprocess is None:
            preprocess = (Preprocess.cifar(image_size) if image_size < 64
                          else Preprocess.imagenet(image_size, resize=round(image_size * 256 / 224)))
        return imagefolder.scan(path, split, preprocess, classes=classes, aliases=class_aliases,
                                skip_bad=skip_bad_images, workers=workers)
    raise DataError(f"{path} is not a CIFAR folder nor an ImageFolder tree (train/ and val/ with class folders)")


def check_classes(ds: Dataset, num_classes: int, model: str, *, fix: str) -> None:
    """Raise when `ds` has another class count than the model: labels would not mean the model's outputs.

    Synthetic data (labels 0..9) fits any model with at least that many classes. `fix` says what to pass.
    """
    if ds.num_classes == num_classes or (ds.synthetic and ds.num_classes <= num_classes):
        return
    raise DataError(f"data {ds.name} ({ds.split}) has {ds.num_classes} classes, {model} has {num_classes}; {fix}")


# ---------------------------------------------------------------- subsets and batches


def subset_indices(ds: AnyDataset, n: int, seed: int = 0, class_balanced: bool = True,
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted indices of n images (all when n >= len), as evenly spread over the classes as the data allows.

    Deterministic for a seed; images in `exclude` (indices) are never picked, e.g. a calibration set.
    """
    allowed = torch.ones(len(ds), dtype=torch.bool)
    if exclude is not None and len(exclude):
        allowed[exclude] = False
    if n >= int(allowed.sum()):
        return torch.nonzero(allowed).flatten()
    g = torch.Generator().manual_seed(seed)
    if not class_balanced:
        idx = torch.randperm(len(ds), generator=g)
        idx = idx[allowed[idx]][:n]
    else:
        per_class = [torch.nonzero(ds.labels == c).flatten() for c in range(max(ds.num_classes, 1))]
        per_class = [p[torch.randperm(len(p), generator=g)] for p in per_class if len(p)]
        per_class = [p[allowed[p]] for p in per_class]
        picked: list[torch.Tensor] = []
        rank = 0
        while sum(len(p) for p in picked) < n:
            row = [p[rank : rank + 1] for p in per_class if rank < len(p)]
            if not row:
                break
            picked.extend(row)
            rank += 1
        idx = torch.cat(picked)[:n]
    idx, _ = torch.sort(idx)
    return idx


def subset(ds: AnyDataset, n: int, seed: int = 0, class_balanced: bool = True) -> AnyDataset:
    """n images, as evenly spread over the classes as the data allows; deterministic for a seed."""
    if n >= len(ds):
        return ds
    return ds.take(subset_indices(ds, n, seed=seed, class_balanced=class_balanced))


def _augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Zero-pad by `pad`, take a random crop of the original size, flip half (He et al. 2015)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW in the model's normalisation."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def epoch_order(n: int, *, train: bool, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Index order for one epoch: shuffled for training (from seed and epoch), sharded per rank."""
    if not train:
        idx = torch.arange(n)
    else:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        idx = torch.randperm(n, generator=g)
    if world > 1:
        per = -(-n // world)
        idx = torch.cat([idx, idx[: per * world - n]])  # pad so every rank gets the same count
        idx = idx[rank::world]
    return idx


def batches(
    ds: AnyDataset,
    batch_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic batches of (normalised float32 images, int64 labels).

    In memory: indexed from the uint8 tensor. ImageFolder: decoded by worker processes through the
    set's preprocessing record (random-resized-crop + flip to train 224 px models). Either way the
    CIFAR pad-crop-flip is applied here, and the normalisation is the same function.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    idx = epoch_order(len(ds), train=train, seed=seed, epoch=epoch, rank=rank, world=world)
    g = torch.Generator().manual_seed(seed * 7_919 + epoch * 31 + rank)
    if isinstance(ds, FolderDataset):
        pad_crop = train and ds.preprocess.train_augment == "pad_crop_flip"
        for x, y in imagefolder.uint8_batches(ds, idx, batch_size, train=train, seed=seed, epoch=epoch):
            yield normalize(_augment(x, g) if pad_crop else x, mean, std), y
        return
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        x = ds.images[chunk]
        if train:
            x = _augment(x, g)
        yield normalize(x, mean, std), ds.labels[chunk]


def num_batches(ds: AnyDataset, batch_size: int, world: int = 1) -> int:
    per_rank = -(-len(ds) // world)
    return -(-per_rank // batch_size)
