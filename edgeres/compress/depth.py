"""Depth pruning: remove whole residual blocks, chosen by what bypassing each one costs on images.

A residual block computes x -> merge(residual(x), shortcut(x)). Removing it keeps only what the rest of the
network needs from it:

- an identity-shortcut block (same shape in and out) disappears entirely. In the post-activation ResNets
  (CIFAR, torchvision) its input is already a ReLU output, so relu(0 + x) = x; in a pre-activation WRN block
  its BN-ReLU sits on the residual branch only and goes with it. Either way the network equals the original
  with that block's residual branch zeroed.
- a block whose shape changes keeps its shortcut path: option-A zero-pad subsampling (no parameters) or the
  1x1 projection (option B, torchvision `downsample`: conv + BN), followed by the block's ReLU
  (post-activation). A WRN block reads its projection from the pre-activated input, so its BN-ReLU stays
  with the projection conv: the kept path is exactly what the block computes with its residual branch zeroed.

The kept parts stay under the block's own name and attribute names (`layer2.0.downsample.0.weight`), so a
depth-pruned state_dict loads into a rebuilt model (`edgeres.compress.prune.apply_pruned_spec` replays
`removed_blocks`). Nothing of an identity block reaches the exported ONNX.

Importance is label-free: the mean KL divergence from the unpruned model's softmax to the softmax of the
model with the block bypassed, on images the caller chooses (edgeres uses training images, never the test
split its result is reported on). Greedy selection re-scores the remaining blocks after each removal, always
against the unpruned model (the loss-after-bypass probe of ResNet-56 did the same).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeres.errors import ModelError
from edgeres.models import resnet, resnet_cifar, wrn

POST_ACTIVATION = (resnet_cifar.BasicBlock, resnet.BasicBlock, resnet.Bottleneck)
PRE_ACTIVATION = (wrn.PreActBlock,)
_STAGE = re.compile(r"^layer(\d+)\.(\d+)$")
CACHE_BYTES = 256 << 20  # block inputs kept per scoring batch


# ---------------------------------------------------------------- what a removed block leaves


class RemovedBlock(nn.Module):
    """What a removed residual block leaves in its place; `block` names the block it replaced."""

    leaves = "nothing"

    def __init__(self, block: str) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ShortcutOnly(RemovedBlock):
    """A post-activation block without its residual branch: relu(shortcut(x))."""

    def __init__(self, block: str, downsample: nn.Module) -> None:
        super().__init__(block)
        self.downsample = downsample
        self.relu = nn.ReLU()
        self.leaves = ("zero-pad subsample shortcut (no parameters)"
                       if isinstance(downsample, resnet_cifar.ZeroPadShortcut) else "1x1 projection shortcut")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.downsample(x)
        out = self.relu(out)
        return out


class PreActShortcut(RemovedBlock):
    """A pre-activation (WRN) block without its residual branch: the projection of the pre-activated input."""

    leaves = "pre-activation BN-ReLU + 1x1 projection shortcut"

    def __init__(self, block: str, bn1: nn.BatchNorm2d, shortcut: nn.Conv2d) -> None:
        super().__init__(block)
        self.bn1 = bn1
        self.relu1 = nn.ReLU()
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.relu1(out)
        return self.shortcut(out)


def _leftover(name: str, block: nn.Module) -> RemovedBlock:
    if isinstance(block, POST_ACTIVATION):
        return RemovedBlock(name) if block.downsample is None else ShortcutOnly(name, block.downsample)
    if isinstance(block, PRE_ACTIVATION):
        return RemovedBlock(name) if block.shortcut is None else PreActShortcut(name, block.bn1, block.shortcut)
    raise ModelError(f"{name} is a {type(block).__name__}, not a residual block edgeres can remove")


# ---------------------------------------------------------------- listing blocks


@dataclass(frozen=True)
class Block:
    """One residual block, and what removing it saves (MACs and params as `models.stats` counts them)."""

    name: str  # module path, e.g. "layer2.3"
    stage: int  # 1 for layer1
    index: int  # position in its stage
    in_channels: int
    out_channels: int
    stride: int
    input_size: int  # spatial side of its input at the model's input size
    macs: int
    params: int
    identity: bool  # identity shortcut: removing it leaves nothing
    leaves: str  # what stays when it is removed
    leaves_macs: int
    leaves_params: int

    @property
    def macs_saved(self) -> int:
        return self.macs - self.leaves_macs

    @property
    def params_saved(self) -> int:
        return self.params - self.leaves_params

    def to_dict(self) -> dict:
        return {**asdict(self), "macs_saved": self.macs_saved, "params_saved": self.params_saved}


def _named_blocks(model: nn.Module, kinds: tuple) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and _STAGE.match(n)]


def _shape(block: nn.Module) -> tuple[int, int, int]:
    """In channels, out channels, stride of a residual block."""
    if isinstance(block, resnet.Bottleneck):
        return block.conv1.in_channels, block.bn3.num_features, block.conv2.stride[0]
    if isinstance(block, PRE_ACTIVATION):
        return block.bn1.num_features, block.conv2.out_channels, block.conv1.stride[0]
    return block.conv1.in_channels, block.bn2.num_features, block.conv1.stride[0]


def _ops(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(module, x)
    return int(macs), int(params)


def _input_size(model: nn.Module, input_size: int | None) -> int:
    size = input_size or getattr(getattr(model, "cfg", None), "input_size", None)
    if size is None:
        raise ModelError("the model has no .cfg.input_size; pass input_size")
    return int(size)


@torch.no_grad()
def _block_inputs(model: nn.Module, x: torch.Tensor, kinds: tuple) -> dict[str, torch.Tensor]:
    """Each block's input on `x` (one forward pass, eval mode)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=n: seen.__setitem__(name, inp[0]))
             for n, m in _named_blocks(model, kinds)]
    was_training = model.training
    try:
        model.eval()(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return seen


def residual_blocks(model: nn.Module, input_size: int | None = None) -> list[Block]:
    """Every residual block still in `model`, in forward order (removed ones are `removed_blocks`)."""
    size = _input_size(model, input_size)
    found = _named_blocks(model, POST_ACTIVATION + PRE_ACTIVATION)
    if not found and not removed_blocks(model):
        raise ModelError(f"{type(model).__name__} has no residual blocks edgeres can remove "
                         "(CIFAR ResNets, torchvision ResNets and WRNs have)")
    device = next(model.parameters()).device
    inputs = _block_inputs(model, torch.zeros(1, 3, size, size, device=device), POST_ACTIVATION + PRE_ACTIVATION)
    blocks = []
    for name, m in found:
        stage, index = (int(v) for v in _STAGE.match(name).groups())
        cin, cout, stride = _shape(m)
        x = inputs[name]
        leftover = _leftover(name, m)
        macs, params = _ops(m, x)
        leaves_macs, leaves_params = _ops(leftover, x) if leftover.leaves != "nothing" else (0, 0)
        blocks.append(Block(name, stage, index, cin, cout, stride, int(x.shape[-1]), macs, params,
                            leftover.leaves == "nothing", leftover.leaves, leaves_macs, leaves_params))
    return blocks


def removed_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks removed from `model`, in forward order."""
    return [n for n, m in model.named_modules() if isinstance(m, RemovedBlock)]


# ---------------------------------------------------------------- removing blocks


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def remove_in_place(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace the named blocks of `model` by what they leave (see the module docstring); returns `model`."""
    names = list(names)
    present = dict(_named_blocks(model, POST_ACTIVATION + PRE_ACTIVATION))
    gone = set(removed_blocks(model))
    if len(set(names)) != len(names):
        raise ModelError(f"a block is named twice: {', '.join(names)}")
    for name in names:
        if name in gone:
            raise ModelError(f"block {name} is already removed")
        if name not in present:
            known = ", ".join(list(present)[:6])
            raise ModelError(f"no residual block {name!r} in {type(model).__name__}; blocks are named like {known}, "
                             "... (edgeres blocks MODEL lists them)")
    if names and len(names) == len(present):
        raise ModelError(f"removing all {len(present)} residual blocks leaves no network to fine-tune; remove fewer")
    for name in names:
        _set(model, name, _leftover(name, present[name]))
    return model


def remove_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """A copy of `model` without the named blocks (the input model is untouched); `.cfg` travels with it."""
    return remove_in_place(copy.deepcopy(model), names)


# ---------------------------------------------------------------- what each block costs


@dataclass(frozen=True)
class BlockCost:
    """A block's importance: the mean KL divergence (nats per image) from the unpruned model's predictions to
    those of the model with this block bypassed, given the blocks in `after` already removed."""

    name: str
    cost: float
    after: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "cost": self.cost, "after": list(self.after)}


class _Replay(nn.Module):
    """Stands in for a block before the one being scored: returns that block's output, cached for this batch."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def _kl_sum(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Sum over images of KL(softmax(reference) || softmax(logits))."""
    ref = F.log_softmax(reference.float(), dim=1)
    got = F.log_softmax(logits.float(), dim=1)
    return float(F.kl_div(got, ref, reduction="sum", log_target=True))


def _chunks(images: torch.Tensor | Iterable[torch.Tensor], size: int) -> Iterable[torch.Tensor]:
    for x in [images] if isinstance(images, torch.Tensor) else images:
        if isinstance(x, (tuple, list)):  # (images, labels) batches: labels are not used
            x = x[0]
        yield from torch.split(x, size)


@torch.no_grad()
def _score(reference: nn.Module, current: nn.Module, images, candidates: list[str]) -> dict[str, float]:
    """Mean KL per image of each candidate bypassed in `current`, against `reference` (the unpruned model).

    Blocks before the candidate are replayed from cached outputs, so each candidate costs only the forward
    pass from itself on.
    """
    kinds = POST_ACTIVATION + PRE_ACTIVATION
    order = [n for n, _ in current.named_modules() if isinstance(_, kinds + (RemovedBlock,)) and _STAGE.match(n)]
    sums = dict.fromkeys(candidates, 0.0)
    seen = 0
    batch = None
    reference.eval()
    current.eval()
    for x in _chunks(images, 4096):
        if batch is None:  # as many images per pass as the cached block inputs allow
            per_image = sum(t[:1].numel() * 4 for t in _block_inputs(current, x[:1], kinds + (RemovedBlock,)).values())
            batch = max(1, min(512, CACHE_BYTES // max(per_image, 1)))
        for xb in torch.split(x, batch):
            ref_logits = reference(xb)
            outs = _block_outputs(current, xb, order)
            for name in candidates:
                k = order.index(name)
                swapped = {order[j]: _Replay(outs[order[j]]) for j in range(k)}
                swapped[name] = _leftover(name, current.get_submodule(name))
                originals = {n: current.get_submodule(n) for n in swapped}
                try:
                    for n, mod in swapped.items():
                        _set(current, n, mod)
                    sums[name] += _kl_sum(ref_logits, current(xb))
                finally:
                    for n, mod in originals.items():
                        _set(current, n, mod)
            seen += len(xb)
    if not seen:
        raise ModelError("block importance needs at least one image")
    return {n: s / seen for n, s in sums.items()}


def _block_outputs(model: nn.Module, x: torch.Tensor, order: list[str]) -> dict[str, torch.Tensor]:
    outs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda mod, inp, out, name=n: outs.__setitem__(name, out))
             for n in order]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _candidates(model: nn.Module, candidates: Sequence[str] | None) -> list[str]:
    present = [n for n, _ in _named_blocks(model, POST_ACTIVATION + PRE_ACTIVATION)]
    if candidates is None:
        return present
    unknown = [c for c in candidates if c not in present]
    if unknown:
        raise ModelError(f"candidate blocks not in the model: {', '.join(unknown)}")
    return list(candidates)


def block_importance(model: nn.Module, images, *, candidates: Sequence[str] | None = None) -> dict[str, float]:
    """Each block's cost when bypassed alone: mean KL (nats per image) of `model` with it removed, to `model`.

    `images`: normalised input tensors (one [N, 3, H, W] tensor, or an iterable of them or of (x, y) batches;
    labels are ignored). `candidates` limits which blocks are scored (default: every block still there).
    """
    return _score(model, model, images, _candidates(model, candidates))


def choose_blocks(model: nn.Module, images, count: int, *, greedy: bool = True,
                  candidates: Sequence[str] | None = None) -> list[BlockCost]:
    """The `count` blocks whose removal costs least, in removal order, with the cost measured at each step.

    Greedy: remove the cheapest block, re-score the rest with it removed (always against `model`), repeat.
    Not greedy: the `count` cheapest of one scoring pass, each cost measured alone.
    `images` is materialised once (greedy passes over it `count` times).
    """
    pool = _candidates(model, candidates)
    if not 0 < count <= len(pool):
        raise ModelError(f"cannot remove {count} of the {len(pool)} candidate blocks; pass 1..{len(pool)}")
    if greedy and count > 1 and not isinstance(images, torch.Tensor):
        images = [x[0] if isinstance(x, (tuple, list)) else x for x in images]
    if not greedy:
        costs = _score(model, model, images, pool)
        return [BlockCost(n, costs[n]) for n in sorted(pool, key=lambda n: (costs[n], n))[:count]]
    current = copy.deepcopy(model).eval()
    chosen: list[BlockCost] = []
    for _ in range(count):
        costs = _score(model, current, images, pool)
        best = min(pool, key=lambda n: (costs[n], n))
        chosen.append(BlockCost(best, costs[best], tuple(c.name for c in chosen)))
        remove_in_place(current, [best])
        pool.remove(best)
    return chosen
