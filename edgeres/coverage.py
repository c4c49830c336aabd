"""INT8 coverage: the share of a model's MACs that really runs in INT8, and the layers that do not.

Measured where the runtime says what it runs (ONNX Runtime's optimized graph, OpenVINO's runtime
precisions: see each backend's `int8_coverage`); for TensorRT, whose engine is built on the device,
`expected` reads it from the Q/DQ placement and says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from edgeres.fallback import Layer, all_layers

EXPECTED = "expected from the Q/DQ placement (TensorRT builds the engine on the device; not measured)"


@dataclass(frozen=True)
class Coverage:
    """INT8 share of MACs (0..1) over the Conv/Gemm layers, where the figure comes from, and the float layers."""

    int8_mac_share: float
    int8_layers: int
    layers: int
    source: str
    float_layers: list[str] = field(default_factory=list)  # PyTorch module names, graph order

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")

    def to_dict(self) -> dict:
        return asdict(self)


def from_layers(layers: list[Layer], int8: Iterable[str], source: str) -> Coverage:
    """Coverage of `layers` given the module or node names that run in INT8."""
    int8 = set(int8)
    total = sum(layer.macs for layer in layers)
    on = [layer for layer in layers if layer.module in int8 or layer.node in int8]
    share = sum(layer.macs for layer in on) / total if total else 0.0
    return Coverage(int8_mac_share=round(share, 4), int8_layers=len(on), layers=len(layers), source=source,
                    float_layers=[layer.module for layer in layers if layer not in on])


def expected(onnx_model) -> Coverage:
    """What TensorRT explicit quantization runs in INT8: the layers with Q/DQ on both weight and input."""
    from edgeres.fallback import DATA_MOVEMENT
    from edgeres.onnxgraph import Graph

    gr = Graph(onnx_model)
    layers = all_layers(onnx_model)
    nodes = {n.name: n for n in gr.g.node}

    def quantized_input(name: str) -> bool:
        while (src := gr.producer.get(name)) is not None:
            if src.op_type == "DequantizeLinear":
                return True
            if src.op_type not in DATA_MOVEMENT:
                return False
            name = src.input[0]
        return False

    int8 = [layer.node for layer in layers
            if quantized_input(nodes[layer.node].input[0]) and quantized_input(nodes[layer.node].input[1])]
    return from_layers(layers, int8, EXPECTED)
