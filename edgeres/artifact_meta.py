"""What an artifact says about itself: the metadata record inside every file edgeres ships.

One record (`ArtifactMeta`) holds what a consumer needs to use a model correctly with nothing else
at hand: the class names in output order, the input name, shape and layout, the whole preprocessing
record (`edgeres.preprocess.Preprocess.to_dict()`), the weights' provenance (tag, file, sha256), the
precision and the edgeres version. This module is the one writer and reader of that record:

- ONNX: one `metadata_props` entry, key `edgeres`, value the record as JSON. ONNX Runtime shows it as
  `session.get_modelmeta().custom_metadata_map["edgeres"]`.
- OpenVINO IR: the same JSON in the model's `rt_info` under `edgeres` (set by backends/openvino.py
  when it converts an ONNX that carries it).
- Jetson bundle and TensorRT engines: a JSON sidecar, `artifact.json`, beside the engine, which the
  bundle's stand-alone runner reads (an engine file has no place for metadata).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeres.errors import EdgeresError
from edgeres.preprocess import Preprocess

FORMAT = "edgeres-artifact/1"
KEY = "edgeres"              # ONNX metadata_props key and OpenVINO rt_info key
SIDECAR = "artifact.json"    # beside an engine / in a Jetson bundle


@dataclass(frozen=True)
class ArtifactMeta:
    """Everything needed to prepare an input for the artifact and to read its output."""

    model: str
    precision: str
    num_classes: int
    input_size: int
    preprocess: Preprocess
    classes: tuple[str, ...] | None = None
    weights: dict[str, Any] = field(default_factory=dict)  # {"tag" or "file", "sha256"} or {"random_init": True}
    dataset: str | None = None
    target: str | None = None
    input_name: str = "input"
    output_name: str = "logits"
    edgeres_version: str = ""

    def __post_init__(self) -> None:
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise EdgeresError(f"{len(self.classes)} class names for a model with {self.num_classes} outputs; "
                               "pass class names that match the classifier (--num-classes or the data set)")
        if self.input_size != self.preprocess.input_size:
            raise EdgeresError(f"input size {self.input_size} differs from the preprocessing crop "
                               f"{self.preprocess.input_size}; the record would prepare the wrong input")
        if not self.edgeres_version:
            from edgeres import __version__

            object.__setattr__(self, "edgeres_version", __version__)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "precision": self.precision,
            "input": {"name": self.input_name, "shape": ["batch", 3, self.input_size, self.input_size],
                      "layout": "NCHW", "dtype": "float32", "color": "RGB"},
            "output": {"name": self.output_name, "shape": ["batch", self.num_classes],
                       "meaning": "logits in class order; softmax gives probabilities"},
            "num_classes": self.num_classes,
            "classes": list(self.classes) if self.classes is not None else None,
            "preprocess": self.preprocess.to_dict(),
            "weights": dict(self.weights),
            "dataset": self.dataset,
            "target": self.target,
            "edgeres_version": self.edgeres_version,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "artifact") -> ArtifactMeta:
        """Read what `to_dict` wrote; a record of another format or with a missing key names the problem."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise EdgeresError(f"{source} carries edgeres metadata of format {found!r}, this edgeres reads "
                               f"{FORMAT}; re-export it with this edgeres")
        try:
            shape = d["input"]["shape"]
            classes = d.get("classes")
            return cls(
                model=str(d["model"]),
                precision=str(d["precision"]),
                num_classes=int(d["num_classes"]),
                input_size=int(shape[-1]),
                preprocess=Preprocess.from_dict(d["preprocess"]),
                classes=tuple(str(c) for c in classes) if classes is not None else None,
                weights=dict(d.get("weights") or {}),
                dataset=d.get("dataset"),
                target=d.get("target"),
                input_name=str(d["input"]["name"]),
                output_name=str(d["output"]["name"]),
                edgeres_version=str(d.get("edgeres_version") or "unknown"),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise EdgeresError(f"{source} carries malformed edgeres metadata ({exc!r}); re-export it") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "artifact") -> ArtifactMeta:
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise EdgeresError(f"{source} carries edgeres metadata that is not JSON ({exc}); re-export it") from exc
        return cls.from_dict(d, source)

    def class_name(self, index: int) -> str:
        """The name of output `index`, or `class <index>` when the artifact has no names."""
        return self.classes[index] if self.classes is not None else f"class {index}"


def for_model(model, *, precision: str, weights: dict[str, Any] | None = None, target: str | None = None,
              data_classes: list[str] | tuple[str, ...] | None = None, dataset: str | None = None) -> ArtifactMeta:
    """The record for an exported `model`: classes from `model.cfg.classes`, else the data set's names;
    preprocessing from `model.cfg.preprocess`."""
    cfg = model.cfg
    classes = cfg.classes
    if classes is None and data_classes:
        if len(data_classes) != cfg.num_classes:
            raise EdgeresError(f"the data set has {len(data_classes)} classes, {cfg.name} has {cfg.num_classes} "
                               "outputs; pass --num-classes or data with the model's classes")
        classes = tuple(data_classes)
    return ArtifactMeta(
        model=cfg.name, precision=precision, num_classes=cfg.num_classes, input_size=cfg.preprocess.input_size,
        preprocess=cfg.preprocess, classes=tuple(classes) if classes is not None else None,
        weights=dict(weights or {}), dataset=dataset or cfg.dataset, target=target,
    )


def weights_provenance(name: str | None, weights: str | os.PathLike | None) -> dict[str, Any]:
    """Where the weights came from: a file (name + sha256), a tag (+ its sha256), or none (random init)."""
    from edgeres.checkpoint import resolve_weights
    from edgeres.io import sha256sum

    if weights is not None:
        if str(weights).startswith(("http://", "https://")):  # --weights URL: the cached download
            from edgeres.weights import fetch_url

            path = fetch_url(str(weights))
            return {"file": path.name, "url": str(weights), "sha256": sha256sum(path)}
        return {"file": Path(weights).name, "sha256": sha256sum(weights)}
    path = resolve_weights(name) if name else None
    if path is not None:
        return {"tag": name, "sha256": sha256sum(path)}
    return {"random_init": True}


# --- ONNX ------------------------------------------------------------------------------------------------


def set_onnx_meta(onnx_model, meta: ArtifactMeta):
    """Put `meta` into an in-memory ONNX model's metadata_props (replacing any earlier record); returns it."""
    props = [p for p in onnx_model.metadata_props if p.key != KEY]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(props)
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = KEY, meta.to_json()
    return onnx_model


def embed_onnx(path: str | os.PathLike, meta: ArtifactMeta) -> Path:
    """Write `meta` into the ONNX file at `path` (rewritten atomically)."""
    import onnx

    from edgeres.export import save_onnx

    path = Path(path)
    return save_onnx(set_onnx_meta(onnx.load(str(path)), meta), path)


def onnx_meta_text(path: str | os.PathLike) -> str | None:
    """The raw JSON record in an ONNX file, or None when it has none."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (protobuf raises several types on garbage)
        raise EdgeresError(f"{path} is not a readable ONNX file ({type(exc).__name__}); re-export it") from exc
    return next((p.value for p in model.metadata_props if p.key == KEY), None)


# --- sidecar (Jetson bundle, engines) -------------------------------------------------------------------------


def write_sidecar(folder: str | os.PathLike, meta: ArtifactMeta, extra: dict[str, Any] | None = None) -> Path:
    """`folder/artifact.json`: the record, plus `extra` sections (e.g. the bundle's self-check)."""
    from edgeres.io import atomic_write

    path = Path(folder) / SIDECAR
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({**meta.to_dict(), **(extra or {})}, indent=2) + "\n", encoding="utf-8")
    return path


def sidecar_text(engine: str | os.PathLike) -> str | None:
    path = Path(engine).parent / SIDECAR
    return path.read_text(encoding="utf-8") if path.is_file() else None


# --- any artifact --------------------------------------------------------------------------------------------


def read(path: str | os.PathLike) -> ArtifactMeta:
    """The record an artifact carries, as its backend keeps it (`Backend.meta_text`): ONNX metadata_props,
    IR rt_info, or the sidecar beside an engine."""
    path = Path(path)
    if not path.is_file():
        raise EdgeresError(f"artifact {path} not found")
    from edgeres.backends.base import get_backend, runtime_for

    text, where = get_backend(runtime_for(path)).meta_text(path)  # each runtime keeps the record its own way
    if text is None:
        raise EdgeresError(f"{path} carries no edgeres metadata in {where} (made by an older edgeres or another "
                           "tool); re-export it with `edgeres export`")
    return ArtifactMeta.from_json(text, source=str(path))
