"""ResNet-18 for CIFAR: 3x3 stem without max-pool, four stages of two basic
blocks with projection (1x1 conv + BN) shortcuts, global average pool."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockModel, stage_blocks
from .resnet_cifar import ClassifierHead, ConvBNReLU, conv3x3


class BasicBlockB(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18(num_classes: int = 10) -> BlockModel:
    blocks: list[tuple[str, nn.Module]] = [("stem", ConvBNReLU(3, 64))]
    cin = 64
    for s, width in enumerate((64, 128, 256, 512)):
        layer = []
        for i in range(2):
            layer.append(BasicBlockB(cin, width, 2 if (s > 0 and i == 0) else 1))
            cin = width
        blocks += stage_blocks(f"L{s + 1}", layer)
    blocks.append(("head", ClassifierHead(cin, num_classes)))
    return BlockModel(blocks, name="resnet18")
