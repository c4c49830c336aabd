"""Structured channel pruning with Torch-Pruning, safe across residual adds.

Only channels private to a block are pruned: a conv's output channels are a candidate when its
Torch-Pruning group (every layer that must shrink with it) reaches no residual add, pad, slice,
concat or reshape, i.e. conv -> BN -> ReLU -> next conv's input. Stage widths, which the adds tie
together (and which Torch-Pruning cannot follow through the option-A zero-pad shortcut), stay as
they are. Kept channel counts are multiples of `round_to` for int8 kernels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgeres.errors import CheckpointError, ModelError
from edgeres.models.stats import count_macs, count_params

IMPORTANCES = ("l1", "l2")
_PASS_THROUGH = ("Relu", "Hardtanh", "Silu", "Gelu", "Sigmoid")  # activations that keep channels private


@dataclass
class PruneReport:
    """Parameters and multiply-accumulates before and after pruning, and the pruned model."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    model: nn.Module

    @property
    def macs_cut(self) -> float:
        """Fraction of MACs removed."""
        return 1.0 - self.macs_after / self.macs_before


def _private(group) -> bool:
    import torch_pruning as tp

    for dep, _ in group:
        node = dep.target
        if node.type in (tp.ops.OPTYPE.CONV, tp.ops.OPTYPE.BN):
            continue
        if node.type == tp.ops.OPTYPE.ELEMENTWISE and str(node.module._grad_fn).startswith(_PASS_THROUGH):
            continue
        return False
    return True


def _importance(name: str):
    import torch_pruning as tp

    if name not in IMPORTANCES:
        raise ModelError(f"importance must be one of {', '.join(IMPORTANCES)}, got {name!r}")
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def _kept(channels: int, ratio: float, round_to: int) -> int:
    keep = round(channels * (1.0 - ratio) / round_to) * round_to
    return min(channels, max(round_to, keep))


def prune(
    model: nn.Module, ratio: float, *, example_input: torch.Tensor, round_to: int = 8, importance: str = "l1"
) -> PruneReport:
    """Remove `ratio` of each block's private conv channels (smallest group L1/L2 norm first).

    Works on a copy; the input model is untouched. Returns sizes before and after.
    """
    import torch_pruning as tp

    if not 0.0 <= ratio < 1.0:
        raise ModelError(f"pruning ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise ModelError(f"round_to must be >= 1, got {round_to}")
    scorer = _importance(importance)
    pruned = copy.deepcopy(model).eval()
    size = int(example_input.shape[-1])
    macs_before, params_before = count_macs(pruned, size), count_params(pruned)

    graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example_input[:1], verbose=False)
    for conv in [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]:
        channels = conv.out_channels
        keep = _kept(channels, ratio, round_to)
        if keep >= channels or conv.groups != 1:
            continue
        if not _private(graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])):
            continue
        scores = scorer(graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(channels))))
        drop = torch.argsort(scores)[: channels - keep].tolist()
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=sorted(drop)).prune()

    macs_after, params_after = count_macs(pruned, size), count_params(pruned)
    return PruneReport(params_before, params_after, macs_before, macs_after, pruned)


def _shape(m: nn.Module) -> tuple[int, int] | None:
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.BatchNorm2d):
        return m.num_features, m.num_features
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return None


SPEC_FORMAT = "edgeres-pruned/2"


def _layer_shapes(model: nn.Module) -> dict:
    spec = {}
    for name, m in model.named_modules():
        shape = _shape(m)
        if shape is not None:
            spec[name] = {"type": type(m).__name__, "in": shape[0], "out": shape[1]}
    return spec


def pruned_spec(model: nn.Module) -> dict:
    """What rebuilds a pruned model from a fresh one: the residual blocks removed (depth pruning, in forward
    order) and the shape of every conv, BN and linear left ({name: {"type", "in", "out"}})."""
    from edgeres.compress.depth import removed_blocks

    return {"format": SPEC_FORMAT, "removed_blocks": removed_blocks(model), "layers": _layer_shapes(model)}


def _reshaped(m: nn.Module, cin: int, cout: int) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(
            cin, cout, m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
            groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
        )
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(cout, eps=m.eps, momentum=m.momentum, affine=m.affine,
                              track_running_stats=m.track_running_stats)
    return nn.Linear(cin, cout, bias=m.bias is not None)


def apply_pruned_spec(model: nn.Module, spec: dict) -> nn.Module:
    """Make a freshly built model take a pruned state_dict strictly: remove the spec's blocks, then reshape its
    layers in place. Reads this module's format and the layer-only map written before depth pruning existed."""
    from edgeres.compress.depth import remove_in_place

    if spec.get("format") == SPEC_FORMAT:
        removed, layers = spec.get("removed_blocks") or [], spec.get("layers") or {}
    elif "format" in spec:
        raise CheckpointError(f"pruned spec format {spec['format']!r} is newer than this edgeres reads "
                              f"({SPEC_FORMAT}); upgrade edgeres")
    else:
        removed, layers = [], spec
    if removed:
        try:
            remove_in_place(model, removed)
        except ModelError as exc:
            raise CheckpointError(f"the checkpoint's removed blocks do not fit the model: {exc}; rebuild the "
                                  "checkpoint's own architecture (same model name and options)") from exc
    modules = dict(model.named_modules())
    for name, entry in layers.items():
        m = modules.get(name)
        if m is None or type(m).__name__ != entry.get("type"):
            raise CheckpointError(
                f"pruned layer {name!r} ({entry.get('type')}) is not in the model; "
                "rebuild the checkpoint's own architecture (same model name and options)"
            )
        if _shape(m) == (entry["in"], entry["out"]):
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(modules[parent] if parent else model, leaf, _reshaped(m, int(entry["in"]), int(entry["out"])))
    return model
