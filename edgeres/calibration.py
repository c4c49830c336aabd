"""Calibration sets (calibration/*.toml): which images, how many, which preprocessing.

One definition serves INT8 post-training calibration, QAT initialisation and TensorRT
calibration caches, so every consumer sees the same images.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgeres.data import Dataset, batches, subset_indices
from edgeres.errors import EdgeresError

# calibration/ at the repository top; edgeres/_data/calibration links to it in a checkout, a wheel holds a copy
CALIBRATION_DIR = Path(__file__).resolve().parent / "_data" / "calibration"
PREPROCESSING = ("eval",)


@dataclass(frozen=True)
class CalibrationSpec:
    name: str
    size: int
    split: str = "train"
    class_balanced: bool = True
    seed: int = 0
    preprocessing: str = "eval"
    batch_size: int = 64
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_dir() -> Path:
    return Path(os.environ.get("EDGERES_CALIBRATION", CALIBRATION_DIR))


def list_calibrations() -> list[str]:
    return sorted(p.stem for p in calibration_dir().glob("*.toml"))


def load_calibration(name: str = "default", *, size: int | None = None) -> CalibrationSpec:
    """Read `calibration/<name>.toml` (or a path); `size` overrides its image count."""
    path = Path(name) if name.endswith(".toml") else calibration_dir() / f"{name}.toml"
    if not path.is_file():
        raise EdgeresError(f"calibration set {name!r} not found; known: {', '.join(list_calibrations())}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeresError(f"{path}: invalid TOML ({exc})") from exc
    fields = set(CalibrationSpec.__dataclass_fields__)
    unknown = set(raw) - fields
    if unknown:
        raise EdgeresError(f"{path}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(fields))}")
    raw.setdefault("name", path.stem)
    if not isinstance(raw.get("size"), int) or raw["size"] < 1:
        raise EdgeresError(f"{path}: key 'size' must be a positive integer")
    if raw.get("split", "train") not in ("train", "test"):
        raise EdgeresError(f"{path}: key 'split' must be 'train' or 'test'")
    if raw.get("preprocessing", "eval") not in PREPROCESSING:
        raise EdgeresError(f"{path}: key 'preprocessing' must be one of {', '.join(PREPROCESSING)}")
    spec = CalibrationSpec(**raw)
    if size is not None:
        if size < 1:
            raise EdgeresError(f"--calib must be >= 1, got {size}")
        spec = CalibrationSpec(**{**asdict(spec), "size": size})
    return spec


def calibration_indices(spec: CalibrationSpec, ds: Dataset) -> torch.Tensor:
    """Indices into `ds` (the spec's split) of the images the spec selects."""
    if ds.split != spec.split:
        raise EdgeresError(f"calibration set {spec.name!r} draws from the {spec.split} split, got {ds.split}")
    return subset_indices(ds, spec.size, seed=spec.seed, class_balanced=spec.class_balanced)


def calibration_set(spec: CalibrationSpec, ds: Dataset) -> Dataset:
    """The images the spec selects from `ds` (which must be the spec's split)."""
    idx = calibration_indices(spec, ds)
    return ds if len(idx) == len(ds) else ds.take(idx)


def calibration_batches(spec: CalibrationSpec, ds: Dataset, mean, std) -> list[torch.Tensor]:
    """Normalised image batches, preprocessed exactly as for evaluation."""
    chosen = calibration_set(spec, ds)
    return [x for x, _ in batches(chosen, spec.batch_size, mean=mean, std=std, train=False)]
