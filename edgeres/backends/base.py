"""The backend contract: compile an ONNX file for a target, load it, run batches.

One module per runtime; `get_backend(runtime)` imports it on first use so `import edgeres` works
without TensorRT or OpenVINO installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from edgeres.errors import TargetError

if TYPE_CHECKING:
    from edgeres.targets import Target

Session = Any  # the runtime's own session object (ort.InferenceSession, a TensorRT context, ...)


@dataclass(frozen=True)
class Artifact:
    """A compiled model on disk: the file, the runtime that runs it, its precision, and facts about it."""

    path: Path
    runtime: str
    precision: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeOptions:
    """Runtime knobs: CPU threads (None: the runtime's default) and device (None: the default one)."""

    threads: int | None = None
    device: str | None = None


@runtime_checkable
class Backend(Protocol):
    name: str
    suffix: str  # the artifact's file suffix: ".onnx", ".xml", ".engine"
    runs_on_host: bool  # can this machine load and time its artifacts?

    def flavour(self, qdq: Any) -> Any: ...  # onnx.ModelProto in the exporter's Q/DQ -> this runtime's dialect

    def compile(self, onnx: Path, target: Target, out: Path) -> Artifact: ...

    def load(self, artifact: Artifact, options: RuntimeOptions | None = None) -> Session: ...

    def run(self, session: Session, batch: np.ndarray) -> np.ndarray: ...


# runtime name -> "module:Class"; imported lazily.
_BACKENDS = {
    "onnxruntime": "edgeres.backends.ort:OrtBackend",
    "tensorrt": "edgeres.backends.tensorrt:TensorRTBackend",
    "openvino": "edgeres.backends.openvino:OpenVINOBackend",
}


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def host_runtimes() -> list[str]:
    """The runtimes whose artifacts this machine can load and time: the one answer to "what runs here"."""
    names = []
    for runtime in list_backends():
        try:
            if get_backend(runtime).runs_on_host:
                names.append(runtime)
        except TargetError:  # its library is not installed
            continue
    return names


def get_backend(runtime: str) -> Backend:
    """The backend for `runtime` ("onnxruntime", "tensorrt", "openvino")."""
    spec = _BACKENDS.get(runtime)
    if spec is None:
        raise TargetError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(list_backends())}")
    module_name, _, cls_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TargetError(
            f"the {runtime} backend cannot be loaded ({exc}); install the runtime or pick another target"
        ) from exc
    return getattr(module, cls_name)()
