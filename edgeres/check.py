"""Lint an ONNX model against a target: every construct TensorRT rejects or runs slowly, by node.

TensorRT rules (NOTES-quantization, "TensorRT"): explicit quantization only, Q/DQ in int8 with
zero point 0, per-channel weight scales on the output-channel axis (axis 0 for Conv), opset >= 13
for per-channel, per-tensor activations, and the residual Add quantized on its identity input so
that Conv + Add fuse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from edgeres import onnxgraph
from edgeres.backends.base import get_backend
from edgeres.errors import ExportError
from edgeres.onnxgraph import GraphView

if TYPE_CHECKING:
    import onnx

    from edgeres.targets import Target

Severity = Literal["error", "warning"]
MODEL = "(model)"  # the `node` of findings about the model as a whole



@dataclass(frozen=True)
class Finding:
    severity: Severity
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node}: {self.message}"


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules(self) -> set[str]:
        return {f.rule for f in self.findings}

    def to_dict(self) -> dict:
        return {"ok": self.ok, "findings": [asdict(f) for f in self.findings]}

    def raise_for_errors(self, what: str = "model") -> None:
        """Raise ExportError listing the errors, if any."""
        if self.errors:
            first = "; ".join(str(f) for f in self.errors[:3])
            more = f" (+{len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
            raise ExportError(f"{what} is not valid for the target: {first}{more}; see `edgeres check`")


# --- graph view ---------------------------------------------------------------------------------------






# --- rules ---------------------------------------------------------------------------------------------

Rule = Callable[[GraphView, "Target"], Iterator[Finding]]


def _opset_range(g: GraphView, target: Target) -> Iterator[Finding]:
    if not target.admits_opset(g.opset):
        lo, hi = target.onnx_opset
        yield Finding("error", "opset-range", MODEL,
                      f"opset {g.opset} is outside {target.name}'s range {lo}..{hi}; export with opset {hi}")


def _custom_domains(g: GraphView, target: Target) -> Iterator[Finding]:
    allowed = {"", "ai.onnx"} | get_backend(target.runtime).custom_domains
    for node in g.nodes:
        if node.domain not in allowed:
            yield Finding("error", "custom-domain", g.name(node),
                          f"{node.domain}::{node.op_type} is not a standard ONNX op and {target.runtime} "
                          "cannot run it; strip the quantizer (nncf.strip) before export")


def _dynamic_shapes(g: GraphView, target: Target) -> Iterator[Finding]:
    for inp in g.graph.input:
        if inp.name in g.consts or not inp.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if axis > 0 and not (dim.HasField("dim_value") and dim.dim_value > 0):
                what = dim.dim_param or "?"
                yield Finding("warning", "dynamic-shape", inp.name,
                              f"dimension {axis} is dynamic ({what}); only the batch dimension should be: "
                              "export with a fixed input size")


def _per_channel(g: GraphView, target: Target) -> Iterator[Finding]:
    for dq in g.of_type("DequantizeLinear"):
        scale = g.const(dq, 1)
        if scale is not None and scale.size > 1 and g.opset < 13:
            yield Finding("error", "per-channel-opset", g.name(dq),
                          f"per-channel quantization needs opset >= 13, the model has {g.opset}")












_GENERIC_RULES: tuple[Rule, ...] = (_opset_range, _custom_domains, _dynamic_shapes, _per_channel)


def check_onnx(path_or_model: str | os.PathLike | onnx.ModelProto, target: Target | str) -> CheckReport:
    """Lint a model for `target` (a Target or its name): generic rules, then its runtime's (`Backend.lint_rules`)."""
    if isinstance(target, str):
        from edgeres import targets

        target = targets.load(target)
    model = onnxgraph.load(path_or_model)
    g = GraphView(model)
    rules = _GENERIC_RULES + tuple(get_backend(target.runtime).lint_rules)
    return CheckReport([f for rule in rules for f in rule(g, target)])


