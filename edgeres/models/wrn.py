"""Wide ResNets (Zagoruyko & Komodakis 2016, arXiv 1605.07146): WRN-d-k, d = 6n+4.

Pre-activation blocks (BN-ReLU-conv). Stage widths 16k, 32k, 64k after a 16-channel stem; a
1x1 projection shortcut where the width or stride changes (as in the authors' code). The BNs sit
before convolutions, so they cannot fold into a preceding conv (see compress.fold_bn).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from edgeres.errors import ModelError
from edgeres.models.registry import ModelCfg, register_pattern


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.relu1(out)
        # Where the shape changes, the projection reads the pre-activated input (authors' code).
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu2(out)
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + identity


class WideResNet(nn.Module):
    """WRN-depth-width for small (CIFAR-sized) images."""

    def __init__(self, depth: int, width: int, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ModelError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ModelError(f"WRN width k must be an integer >= 1, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout must be in [0, 1), got {dropout}")
        if num_classes < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(widths[0], widths[1], n, 1, dropout)
        self.layer2 = self._make_layer(widths[1], widths[2], n, 2, dropout)
        self.layer3 = self._make_layer(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
        layers = [PreActBlock(in_planes, planes, stride, dropout)]
        layers += [PreActBlock(planes, planes, 1, dropout) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.bn(x)
        x = self.relu(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _parse(m: re.Match) -> dict:
    return {"depth": int(m.group(1)), "width": int(m.group(2))}


@register_pattern(r"wrn-(\d+)-(\d+)", "wrn-D-K", _parse)
def wrn(
    *, depth: int, width: int, num_classes: int = 10, dropout: float = 0.0, input_size: int = 32,
    dataset: str = "cifar10",
) -> WideResNet:
    """WRN-depth-width, e.g. wrn-16-4 (2.7M params) or wrn-28-10 (36.5M)."""
    model = WideResNet(depth, width, num_classes=num_classes, dropout=dropout)
    model.cfg = ModelCfg(
        name=f"wrn-{depth}-{width}",
        family="wrn",
        num_classes=num_classes,
        input_size=input_size,
        dataset=dataset,
        arch={"dropout": dropout},
    )
    return model
