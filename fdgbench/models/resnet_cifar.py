"""CIFAR ResNets of He et al. (2016), section 4.2: 6n+2 layers, option-A
(parameter-free, zero-padding) shortcuts, global average pooling.

The FDG authors' version pools with AvgPool2d(6) on the 8x8 map (only the
top-left 6x6 window); we use the global pool of the original paper (see
shared/paper/REFERENCE.md, note 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockModel, residual_stages

WIDTHS = (16, 32, 64)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(conv3x3(cin, cout), nn.BatchNorm2d(cout), nn.ReLU())


class ClassifierHead(nn.Sequential):
    """Global average pool, flatten, linear."""

    def __init__(self, width: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, then ReLU (He et al.'s basic
    block); subclasses choose the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class BasicBlockA(BasicBlock):
    """Option-A shortcut: subsample by the stride and zero-pad the new
    channels, so the shortcut has no parameters."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.stride = stride
        self.pad_channels = cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.pad_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))


def _he_init(module: nn.Module) -> None:
    # The reference CIFAR ResNet code initialises conv and linear weights with
    # Kaiming-normal (fan_in); BN keeps weight 1, bias 0.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


def resnet_cifar(depth: int, num_classes: int = 10, widths: tuple[int, int, int] = WIDTHS,
                 name: str | None = None) -> BlockModel:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    layers, width = residual_stages(widths[0], widths, (depth - 2) // 6, BasicBlockA)
    blocks = [("stem", ConvBNReLU(3, widths[0])), *layers, ("head", ClassifierHead(width, num_classes))]
    model = BlockModel(blocks, name=name or f"resnet{depth}")
    model.apply(_he_init)
    return model
