"""The preprocessing record: how an image file becomes a model input, written once.

Each model has one `Preprocess` (from its weights tag, its training run or its data set). Training,
calibration, evaluation, export and `predict` all read that record, and artifacts carry
`Preprocess.to_dict()` in their metadata. `load_rgb`, `resize_crop` and `eval_array` are the one
implementation of decode / resize / centre-crop / normalise. They use only numpy and Pillow, so a
consumer without edgeres can mirror them line for line from the metadata alone.

Evaluation follows torchvision's transforms on PIL images: `Resize(resize)` scales the shorter side
(the longer one is truncated, not rounded), Pillow's filters antialias when they shrink, then
`CenterCrop(input_size)` with the offsets rounded half to even, as Python's `round` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeres.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
TRAIN_AUGMENTS = ("pad_crop_flip", "random_resized_crop_flip", "none")
RECORD_VERSION = 1


@dataclass(frozen=True)
class Preprocess:
    """Decode to RGB, resize the shorter side to `resize`, centre-crop `input_size`, scale to [0, 1],
    subtract `mean`, divide by `std`; NCHW float32. `train_augment` names the training transform."""

    input_size: int = 32
    resize: int = 32
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    train_augment: str = "pad_crop_flip"

    def __post_init__(self) -> None:
        if self.input_size < 1 or self.resize < self.input_size:
            raise DataError(
                f"preprocessing needs input_size >= 1 and resize >= input_size, "
                f"got input_size {self.input_size}, resize {self.resize}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise DataError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.train_augment not in TRAIN_AUGMENTS:
            raise DataError(f"train_augment must be one of {', '.join(TRAIN_AUGMENTS)}, got {self.train_augment!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise DataError(f"mean and std need 3 values each, std > 0; got mean {self.mean}, std {self.std}")

    @classmethod
    def cifar(cls, input_size: int = 32, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Preprocess:
        """Small-image models: no resize beyond the input size; 4-pixel pad + crop + flip to train."""
        return cls(input_size, input_size, "bilinear", tuple(mean), tuple(std), "pad_crop_flip")

    @classmethod
    def imagenet(cls, input_size: int = 224, resize: int = 256, interpolation: str = "bilinear") -> Preprocess:
        """torchvision's ImageNet evaluation: resize the shorter side, centre-crop; random-resized-crop to train."""
        return cls(input_size, resize, interpolation, IMAGENET_MEAN, IMAGENET_STD, "random_resized_crop_flip")

    def to_dict(self) -> dict[str, Any]:
        """The record as artifacts carry it: every step spelled out for a consumer without edgeres."""
        return {
            "version": RECORD_VERSION,
            "color": "RGB",
            "layout": "NCHW",
            "dtype": "float32",
            "resize_shorter_side": self.resize,
            "interpolation": self.interpolation,
            "antialias": True,
            "center_crop": self.input_size,
            "scale": 1 / 255,
            "mean": list(self.mean),
            "std": list(self.std),
            "train_augment": self.train_augment,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Read what `to_dict` wrote; a missing or wrong key is a DataError naming it."""
        try:
            if d.get("color", "RGB") != "RGB" or d.get("layout", "NCHW") != "NCHW":
                raise DataError(f"unsupported preprocessing: color {d.get('color')!r}, layout {d.get('layout')!r}")
            return cls(
                input_size=int(d["center_crop"]),
                resize=int(d["resize_shorter_side"]),
                interpolation=str(d["interpolation"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                train_augment=str(d.get("train_augment", "none")),
            )
        except KeyError as exc:
            raise DataError(f"preprocessing record lacks the key {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise DataError(f"preprocessing record is malformed: {exc}") from exc


def _pil_filter(name: str):
    from PIL import Image

    return {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }[name]


def load_rgb(path: str | Path):
    """Decode any image file Pillow reads (grayscale, CMYK, palette, RGBA, 16-bit, EXIF-rotated) to RGB.

    An unreadable file is a DataError naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `shorter` (torchvision's rule: truncate the longer)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize_crop(img, pp: Preprocess):
    """Resize the shorter side to `pp.resize`, then centre-crop `pp.input_size` square (a PIL image)."""
    w, h = img.size
    new = resized_size(w, h, pp.resize)
    if new != (w, h):
        img = img.resize(new, _pil_filter(pp.interpolation))
    w, h = img.size
    c = pp.input_size
    top = int(round((h - c) / 2.0))
    left = int(round((w - c) / 2.0))
    return img.crop((left, top, left + c, top + c))


def to_uint8_chw(img) -> np.ndarray:
    """A PIL RGB image as a uint8 array, channels first."""
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize_array(x: np.ndarray, pp: Preprocess) -> np.ndarray:
    """uint8 (..., 3, H, W) -> float32 in the model's normalisation."""
    mean = np.asarray(pp.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pp.std, dtype=np.float32).reshape(3, 1, 1)
    return ((x.astype(np.float32) / np.float32(255.0)) - mean) / std


def eval_array(path_or_image, pp: Preprocess) -> np.ndarray:
    """One image file (or PIL image) -> float32 CHW, exactly as evaluation and export feed the model."""
    img = load_rgb(path_or_image) if isinstance(path_or_image, str | Path) else path_or_image.convert("RGB")
    return normalize_array(to_uint8_chw(resize_crop(img, pp)), pp)
