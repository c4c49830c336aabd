"""ResNet-18/34/50/101/152 and Wide ResNet-50-2/101-2 in the torchvision layout (He et al. 2015, arXiv 1512.03385).

Key names and shapes equal torchvision's (conv1, bn1, layer1..4, fc, downsample.0/1), so a
torchvision state_dict loads with strict=True. On inputs smaller than 64 px the stem is the common
CIFAR one (3x3 stride 1, no max-pool); otherwise the ImageNet stem (7x7 stride 2 + max-pool).
Shortcuts are option B: a 1x1 strided projection only where dimensions change.

Two width knobs: `width_per_group` is torchvision's (the inner 3x3 width of a bottleneck is
planes * width_per_group / 64, so 128 doubles it: wide_resnet50_2, Zagoruyko & Komodakis 2016 as
torchvision builds it), and `width_mult` scales every channel count of the stem and the four stages
(64/128/256/512 at 1.0; 16/32/64/128 at 0.25, the quarter-width "mini" ResNet-34).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeres.errors import ModelError
from edgeres.models.registry import ModelCfg, register_model

SMALL_INPUT_MAX = 64  # below this, the ImageNet stem would shrink 32x32 to 8x8 before layer1


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64) -> None:
        super().__init__()
        if width_per_group != 64:  # as torchvision: the wide variants widen the bottleneck's 3x3 only
            raise ModelError(f"BasicBlock (ResNet-18/34) takes width_per_group 64 only, got {width_per_group}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (ResNet-50/101/152); stride on the 3x3 as in torchvision (v1.5).

    The reduced width is planes * width_per_group / 64 (torchvision's formula); the output stays
    planes * 4 whatever the width, so wide_resnet50_2 widens only the inside of each block.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0))
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.relu(out)
        return out


def stage_widths(width_mult: float) -> list[int]:
    """Stem and stage channel counts: 64/128/256/512 scaled by `width_mult` (0.25 -> 16/32/64/128)."""
    if width_mult <= 0:
        raise ModelError(f"width_mult must be > 0, got {width_mult}")
    widths = [64 * width_mult * 2**i for i in range(4)]
    if any(w != int(w) for w in widths):
        raise ModelError(f"width_mult must give whole channel counts from 64, got {width_mult} "
                         f"({widths[0]:g} channels); try 0.25, 0.5, 1 or 2")
    return [int(w) for w in widths]


class ResNet(nn.Module):
    """torchvision-layout ResNet; the stem is 7x7/2 + max-pool, or 3x3/1 with or without the max-pool."""

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000, small_input: bool = False,
                 *, maxpool: bool | None = None, width_per_group: int = 64, width_mult: float = 1.0):
        super().__init__()
        if num_classes < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        if width_per_group < 1:
            raise ModelError(f"width_per_group must be >= 1, got {width_per_group}")
        widths = stage_widths(width_mult)
        self.width_per_group = width_per_group
        self.inplanes = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        keep_pool = not small_input if maxpool is None else maxpool
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if keep_pool else nn.Identity()
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        wpg = self.width_per_group
        layers = [block(self.inplanes, planes, stride, downsample, width_per_group=wpg)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, width_per_group=wpg) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_LAYOUTS: dict[int, tuple[type[nn.Module], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def _resnet(*, depth: int, num_classes: int = 10, input_size: int = 32, dataset: str | None = None,
            width_per_group: int = 64, width_mult: float = 1.0, name: str | None = None,
            small_stem: bool | None = None, maxpool: bool | None = None) -> ResNet:
    if input_size < 8:
        raise ModelError(f"input_size must be >= 8 pixels, got {input_size}")
    block, layers = _LAYOUTS[depth]
    small = input_size < SMALL_INPUT_MAX if small_stem is None else small_stem
    model = ResNet(block, layers, num_classes=num_classes, small_input=small, maxpool=maxpool,
                   width_per_group=width_per_group, width_mult=width_mult)
    arch = {}  # options beyond the name, so a checkpoint rebuilds the same shapes
    if name is None and width_per_group != 64:
        arch["width_per_group"] = width_per_group
    if name is None and width_mult != 1.0:
        arch["width_mult"] = width_mult
    model.cfg = ModelCfg(
        name=name or f"resnet{depth}",
        family="resnet",
        num_classes=num_classes,
        input_size=input_size,
        dataset=dataset or ("cifar10" if input_size < SMALL_INPUT_MAX else "imagefolder"),
        arch=arch,
    )
    return model


@register_model("resnet18")
def resnet18(**kwargs) -> ResNet:
    """ResNet-18; 11,689,512 params with 1000 classes at 224 px (ImageNet stem)."""
    return _resnet(depth=18, **kwargs)


@register_model("resnet34")
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3); 21,797,672 params with 1000 classes at 224 px."""
    return _resnet(depth=34, **kwargs)


@register_model("resnet34_quarter")
def resnet34_quarter(*, num_classes: int = 10, input_size: int = 32, dataset: str | None = None) -> ResNet:
    """The "mini" ResNet-34 of introductory CIFAR-10 courses: ResNet-34 at quarter width.

    Every channel count divided by 4 (stem and stages 16/32/64/128, fc 128 -> classes) and a 3x3
    stride-1 first convolution in place of the 7x7 stride-2 one; everything else as in ResNet-34
    (BasicBlocks 3-4-6-3, option-B projections). The 3x3 stride-2 max-pool after the stem is KEPT:
    the design changes only the first convolution and the widths, so on 32 px input layer1 sees
    16x16 and layer4 2x2 (the CIFAR variant of `resnet34` drops the pool instead; that is a different net).
    """
    return _resnet(depth=34, num_classes=num_classes, input_size=input_size, dataset=dataset, width_mult=0.25,
                   name="resnet34_quarter", small_stem=True, maxpool=True)


@register_model("resnet50")
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3); 25,557,032 params with 1000 classes at 224 px."""
    return _resnet(depth=50, **kwargs)


@register_model("resnet101")
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3)."""
    return _resnet(depth=101, **kwargs)


@register_model("resnet152")
def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (Bottleneck, 3-8-36-3)."""
    return _resnet(depth=152, **kwargs)


@register_model("wide_resnet50_2")
def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2 as torchvision builds it: ResNet-50 with width_per_group 128; 68,883,240 params."""
    kwargs.setdefault("input_size", 224)
    kwargs.setdefault("num_classes", 1000)
    return _resnet(depth=50, width_per_group=128, name="wide_resnet50_2", **kwargs)


@register_model("wide_resnet101_2")
def wide_resnet101_2(**kwargs) -> ResNet:
    """Wide ResNet-101-2 as torchvision builds it: ResNet-101 with width_per_group 128; 126,886,696 params."""
    kwargs.setdefault("input_size", 224)
    kwargs.setdefault("num_classes", 1000)
    return _resnet(depth=101, width_per_group=128, name="wide_resnet101_2", **kwargs)
