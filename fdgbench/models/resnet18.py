"""ResNet-18 for CIFAR: 3x3 stem without max-pool, four stages of two basic
blocks with projection (1x1 conv + BN) shortcuts, global average pool."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import BlockModel, residual_stages
from .resnet_cifar import BasicBlock, ClassifierHead, ConvBNReLU


class BasicBlockB(BasicBlock):
    """Projection shortcut (1x1 conv + BN) where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.projection = None
        if stride != 1 or cin != cout:
            self.projection = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.projection is None else self.projection(x)


def resnet18(num_classes: int = 10) -> BlockModel:
    layers, width = residual_stages(64, (64, 128, 256, 512), 2, BasicBlockB)
    return BlockModel([("stem", ConvBNReLU(3, 64)), *layers, ("head", ClassifierHead(width, num_classes))],
                      name="resnet18")
