"""The backend contract and the registry of runtimes: everything edgeres knows about a runtime is a backend member.

A backend names its artifacts' suffix, says whether it runs on this host, rewrites Q/DQ ONNX into its
dialect (`flavour`), compiles ONNX for a target, opens an artifact on disk (precision and bytes from the
file), loads and runs it, and adds its bundle extras. One module per runtime, one line in `_BACKENDS`;
`get_backend(runtime)` imports it on first use, so `import edgeres` works without TensorRT or OpenVINO.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgeres.errors import EdgeresError, TargetError

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
    suffix: str  # the suffix of the artifacts it writes: ".onnx", ".xml", ".engine"
    reads: tuple[str, ...]  # the suffixes of the artifacts it opens (TensorRT: ".engine", ".plan")
    qdq_flavour: str  # the name targets/*.toml give its Q/DQ dialect ("cpu", "openvino", "tensorrt")
    runs_on_host: bool  # can this machine load and time its artifacts?
    precisions: tuple[str, ...]  # what its artifacts can run as ("fp32", "fp16", "int8")
    custom_domains: frozenset[str]  # ONNX op domains it runs besides the standard one
    lint_rules: tuple  # edgeres.check rules of its own: (GraphView, Target) -> Iterator[Finding]

    def flavour(self, qdq: Any) -> Any: ...  # onnx.ModelProto in the exporter's Q/DQ -> this runtime's dialect

    # `target` is an edgeres.targets.Target (not imported here: targets asks this registry for runtime names)
    def compile(self, onnx: Path, target: Any, out: Path) -> Artifact: ...

    def open(self, path: Path) -> Artifact: ...  # an artifact on disk: precision and bytes read from the file

    def meta_text(self, path: Path) -> tuple[str | None, str]: ...  # its edgeres metadata record, and where kept

    def bundle_extras(self, folder: Path, target: Any, **facts: Any) -> dict: ...  # files beside the ONNX, facts

    def load(self, artifact: Artifact, options: RuntimeOptions | None = None) -> Session: ...

    def run(self, session: Session, batch: np.ndarray) -> np.ndarray: ...

    # edgeres.peakmem.PeakMemory: the rise of this process's peak RSS for one inference (memory.measure_peak)
    def peak_memory(self, artifact: Artifact, *, batch: int, input_shape: tuple[int, ...],
                    options: RuntimeOptions | None = None) -> Any: ...


# The registry: runtime name -> "module:Class", imported on first use. A new runtime is one line here.
_BACKENDS = {
    "onnxruntime": "edgeres.backends.ort:OrtBackend",
    "tensorrt": "edgeres.backends.tensorrt:TensorRTBackend",
    "openvino": "edgeres.backends.openvino:OpenVINOBackend",
}


def list_backends() -> list[str]:
    """Every runtime edgeres knows (installed or not): what a target's `runtime` may name."""
    return sorted(_BACKENDS)


def _backend_class(runtime: str) -> type:
    """The backend's class; importing its module never imports the runtime library itself."""
    module_name, _, cls_name = _BACKENDS[runtime].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def qdq_flavours() -> tuple[str, ...]:
    """The Q/DQ dialect names a target profile may give (`qdq_flavour`), one per registered backend."""
    return tuple(_backend_class(runtime).qdq_flavour for runtime in list_backends())


def artifact_suffixes() -> dict[str, str]:
    """File suffix -> runtime, over every registered backend (".onnx": "onnxruntime", ".xml": "openvino", ...)."""
    return {suffix: runtime for runtime in list_backends() for suffix in _backend_class(runtime).reads}


def runtime_for(path: str | os.PathLike) -> str:
    """The runtime whose artifacts end like `path`; a one-line error naming the known suffixes otherwise."""
    suffixes = artifact_suffixes()
    runtime = suffixes.get(Path(path).suffix.lower())
    if runtime is None:
        raise EdgeresError(f"cannot tell the runtime of {Path(path).name}; expected one of {', '.join(suffixes)}")
    return runtime


def open_artifact(path: str | os.PathLike) -> Artifact:
    """The artifact at `path` as its backend reads it: precision and bytes from the file itself."""
    path = Path(path)
    if not path.is_file():
        raise EdgeresError(f"artifact {path} not found")
    return get_backend(runtime_for(path)).open(path)


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
    if runtime not in _BACKENDS:
        raise TargetError(f"unknown runtime {runtime!r}; known runtimes: {', '.join(list_backends())}")
    try:
        return _backend_class(runtime)()
    except ImportError as exc:
        raise TargetError(
            f"the {runtime} backend cannot be loaded ({exc}); install the runtime or pick another target"
        ) from exc
