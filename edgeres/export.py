"""torch -> ONNX: FP32 graphs, and int8 ones in a backend's Q/DQ dialect; nothing runtime-specific runs here.

`export_onnx` writes opset-17 ONNX with the TorchScript exporter (the dynamo exporter fails on NNCF
models). A stripped int8 model exports as QuantizeLinear/DequantizeLinear (Q/DQ) pairs, all int8 with
zero point 0, FP32 weights behind their own Q/DQ; `export_int8` hands that graph to the backend's
`flavour` (ONNX Runtime: backends/ort.py, OpenVINO: backends/openvino.py, TensorRT: backends/tensorrt.py),
which rewrites it into the dialect its runtime fuses best, and saves the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from edgeres.errors import ExportError
from edgeres.io import atomic_write
from edgeres.progress import quiet_libraries

if TYPE_CHECKING:
    from edgeres.backends.base import Backend

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module, path: str | Path, *, input_size: int, opset: int = OPSET, dynamic_batch: bool = True
) -> Path:
    """Export `model` (FP32, or stripped int8) for 3 x input_size x input_size images; written atomically."""
    path = Path(path)
    model = model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, input_size, input_size, device=device)
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with atomic_write(path) as tmp:
        try:
            with quiet_libraries():  # the exporter's notes (constant folding of Slice, ...) are no user's business
                torch.onnx.export(
                    model, (example,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                )
        except Exception as exc:  # noqa: BLE001  (the exporter raises many types; name the step)
            raise ExportError(f"ONNX export failed: {exc}; export a stripped model (compress.quantize.strip)") from exc
    return path


def save_onnx(onnx_model, path: str | Path) -> Path:
    """Check and write an in-memory ONNX model atomically."""
    import onnx

    path = Path(path)
    onnx.checker.check_model(onnx_model)
    with atomic_write(path) as tmp:
        onnx.save(onnx_model, str(tmp))
    return path


def export_int8(model: nn.Module, path: str | Path, backend: Backend, *, input_size: int) -> Path:
    """A stripped int8 model (`compress.quantize.strip`) as `backend`'s Q/DQ dialect at `path`: export, flavour, save.

    `backend.flavour` rewrites the exporter's symmetric int8 Q/DQ graph into what its runtime fuses best.
    """
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory(prefix="edgeres-int8-") as tmp:
        raw = export_onnx(model, Path(tmp) / "raw.onnx", input_size=input_size)
        return save_onnx(backend.flavour(onnx.load(str(raw))), path)
