"""Fold each BatchNorm into the convolution that feeds it (eager modules, no torch.fx).

A BN folds when its input is the output of a Conv2d that nothing else reads: post-activation
ResNets (conv-bn pairs, option-B downsample) and the WRN block's conv1 -> bn2. Pre-activation BNs
(WRN block bn1, the final bn) follow a residual add and stay as BN, or with `depthwise=True` become
the same affine map as a depthwise 1x1 conv, which INT8 quantizes like any conv (ONNX Runtime then
fuses it into QLinearConv; its own NCHWc optimizer does the same for FP32, onnxruntime#2855).
Pairs are found by data flow: forward hooks match the BN's input tensor to a conv's output, and
the autograd graph proves the conv output has a single reader.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgeres.errors import ModelError

_BN = (nn.BatchNorm2d,)


@dataclass
class FoldReport:
    """How many BNs were folded, how many had no conv of their own to fold into, and the new model."""

    folded: int
    unfoldable: int
    model: nn.Module


def _example_input(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ModelError("fold_bn needs an example_input for a model without .cfg; pass example_input=")
    return torch.randn(1, 3, cfg.input_size, cfg.input_size)


def _reader_counts(root: torch.Tensor) -> dict:
    """How many autograd nodes read each node's output (a backward-graph walk from `root`)."""
    counts: dict = {}
    seen = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                counts[child] = counts.get(child, 0) + 1
                stack.append(child)
    return counts


def find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor) -> tuple[list[tuple[str, str]], list[str]]:
    """Return (conv, bn) name pairs that can fold, and the names of BNs that cannot."""
    names = {m: n for n, m in model.named_modules()}
    conv_out: dict[int, tuple[str, object]] = {}  # id(output) -> (conv name, its autograd node)
    bn_src: dict[str, tuple[str, object] | None] = {}
    calls: dict[str, int] = {}

    def on_conv(mod, _inp, out):
        conv_out[id(out)] = (names[mod], out.grad_fn)
        calls[names[mod]] = calls.get(names[mod], 0) + 1

    def on_bn(mod, inp):
        src = conv_out.get(id(inp[0]))
        # An inplace op between conv and BN would keep the tensor id but change its autograd node.
        bn_src[names[mod]] = src if src is not None and inp[0].grad_fn is src[1] else None
        calls[names[mod]] = calls.get(names[mod], 0) + 1

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, _BN):
            hooks.append(m.register_forward_pre_hook(on_bn))
    # Inplace ReLUs would make autograd walk a modified tensor; clone input so grads flow from here.
    x = example_input.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    readers = _reader_counts(out if isinstance(out, torch.Tensor) else out[0])

    pairs, unfoldable = [], []
    for bn_name in (n for n, m in model.named_modules() if isinstance(m, _BN)):
        src = bn_src.get(bn_name)
        ok = (
            src is not None
            and calls.get(bn_name) == 1
            and calls.get(src[0]) == 1
            and readers.get(src[1], 0) == 1
        )
        if ok:
            pairs.append((src[0], bn_name))
        else:
            unfoldable.append(bn_name)
    return pairs, unfoldable


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def bn_as_depthwise(bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The eval-mode BN as a depthwise 1x1 conv: weight gamma / sqrt(var + eps), bias beta - mean * weight."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=True)
    with torch.no_grad():
        conv.weight.copy_(scale.reshape(-1, 1, 1, 1))
        conv.bias.copy_(bn.bias - bn.running_mean * scale)
    return conv


def fold_bn(model: nn.Module, *, example_input: torch.Tensor | None = None, depthwise: bool = False) -> FoldReport:
    """Fold BNs into preceding convs in an eval-mode copy of `model`; the input model is untouched.

    Folded BNs become nn.Identity so key names of the other layers stay as they were; with `depthwise`,
    the BNs that cannot fold become depthwise 1x1 convs under their own names.
    """
    folded_model = copy.deepcopy(model).eval()
    pairs, unfoldable = find_conv_bn_pairs(folded_model, _example_input(folded_model, example_input))
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv = folded_model.get_submodule(conv_name)
            bn = folded_model.get_submodule(bn_name)
            _set(folded_model, conv_name, fuse_conv_bn_eval(conv, bn))
            _set(folded_model, bn_name, nn.Identity())
        if depthwise:
            for bn_name in unfoldable:
                _set(folded_model, bn_name, bn_as_depthwise(folded_model.get_submodule(bn_name)))
    return FoldReport(folded=len(pairs), unfoldable=len(unfoldable), model=folded_model)
