"""Wide ResNets (Zagoruyko & Komodakis, 2016), pre-activation basic blocks.

WRN-d-k: (d-4)/6 blocks per stage at widths 16k, 32k, 64k. The head is the
final BN + ReLU + global pool + linear, one block, as in the paper's splits
("... L3 + bn + relu + head"). ``conv_bias=True`` gives the FDG authors'
variant, whose convolutions carry biases (36,489,290 parameters for WRN-28-10
instead of 36,479,194).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockModel, residual_stages


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv_bias: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=conv_bias)
        self.projection = None
        if cin != cout or stride != 1:
            self.projection = nn.Conv2d(cin, cout, 1, stride=stride, bias=conv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        # With a projection the shortcut takes the pre-activated input, as in
        # the reference implementation; otherwise the raw input.
        return out + (self.projection(pre) if self.projection is not None else x)


class PreActHead(nn.Sequential):
    def __init__(self, width: int, num_classes: int):
        super().__init__(nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def _wrn_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)


def wide_resnet(depth: int, widen: int, num_classes: int = 10, conv_bias: bool = False,
                name: str | None = None) -> BlockModel:
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    layers, width = residual_stages(16, (16 * widen, 32 * widen, 64 * widen), (depth - 4) // 6,
                                    lambda cin, cout, stride: PreActBlock(cin, cout, stride, conv_bias))
    blocks = [("stem", nn.Conv2d(3, 16, 3, padding=1, bias=conv_bias)), *layers,
              ("head", PreActHead(width, num_classes))]
    model = BlockModel(blocks, name=name or f"wrn{depth}_{widen}")
    model.apply(_wrn_init)
    return model
