"""CIFAR ResNets (He et al. 2015, arXiv 1512.03385, sec. 4.2): 6n+2 layers, 16/32/64 channels.

Key names follow torchvision (conv1, bn1, layer1..3, fc); research checkpoints with a `linear`
head are mapped on load by `edgeres.checkpoint`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeres.errors import ModelError
from edgeres.models.registry import ModelCfg, register_model

SHORTCUTS = ("A", "B")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: identity with stride-2 subsampling and zero-padded extra channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Post-activation block: conv-bn-relu-conv-bn, add the shortcut, relu."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.downsample = ZeroPadShortcut(in_planes, planes, stride)
            else:  # option B: 1x1 strided projection only where dimensions change
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

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


class CifarResNet(nn.Module):
    """ResNet for 32x32 input: 3x3 stem, three stages of n blocks, global average pool, one FC."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A", widths=(16, 32, 64)) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ModelError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        shortcut = str(shortcut).upper()
        if shortcut not in SHORTCUTS:
            raise ModelError(f"shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
        if num_classes < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        n = (depth - 2) // 6
        self.in_planes = widths[0]
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], n, 1, shortcut)
        self.layer2 = self._make_layer(widths[1], n, 2, shortcut)
        self.layer3 = self._make_layer(widths[2], n, 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _cifar_resnet(
    *, depth: int, num_classes: int = 10, shortcut: str = "A", input_size: int = 32, dataset: str = "cifar10"
) -> CifarResNet:
    model = CifarResNet(depth, num_classes=num_classes, shortcut=shortcut)
    model.cfg = ModelCfg(
        name=f"resnet{depth}",
        family="resnet_cifar",
        num_classes=num_classes,
        input_size=input_size,
        dataset=dataset,
        arch={"shortcut": str(shortcut).upper()},
    )
    return model


@register_model("resnet20")
def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 for 32x32 input (He et al. 2015, sec. 4.2), 0.27M params, option-A shortcuts."""
    return _cifar_resnet(depth=20, **kwargs)


@register_model("resnet32")
def resnet32(**kwargs) -> CifarResNet:
    """ResNet-32 for 32x32 input, 0.46M params."""
    return _cifar_resnet(depth=32, **kwargs)


@register_model("resnet44")
def resnet44(**kwargs) -> CifarResNet:
    """ResNet-44 for 32x32 input, 0.66M params."""
    return _cifar_resnet(depth=44, **kwargs)


@register_model("resnet56")
def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 for 32x32 input, 0.85M params."""
    return _cifar_resnet(depth=56, **kwargs)


@register_model("resnet110")
def resnet110(**kwargs) -> CifarResNet:
    """ResNet-110 for 32x32 input, 1.7M params."""
    return _cifar_resnet(depth=110, **kwargs)
