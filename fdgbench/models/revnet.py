"""Reversible counterparts of the suite's ResNets (RevNet, Gomez, Ren,
Urtasun and Grosse, NeurIPS 2017), the networks PETRA trains (Rivaud et al.,
ICLR 2025).

A reversible block splits its input's channels into halves x1, x2 and
computes y1 = x1 + F(x2), y2 = x2 + G(y1), so its input is rebuilt from its
output: x2 = y2 - G(y1), x1 = y1 - F(x2). F and G are a basic block's
residual branch (conv-BN-ReLU-conv-BN) on C/2 channels. A block that changes
the shape (the first of every stage after the first: stride 2, more
channels) is not reversible and stays the ResNet's own block, as in RevNet
and PETRA. The block names, and so every partition, are the ResNet's.

Precision: the coupling sums are kept in at least float32 (a block's output
is float32 under bf16 autocast; F and G still run in bf16), so rebuilding
the input costs two float32 roundings per half, not bf16 ones: G(y1) and
F(x2) are recomputed on the same values the forward saw.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import BlockModel, residual_stages
from .resnet18 import BasicBlockB
from .resnet_cifar import BasicBlockA, ClassifierHead, ConvBNReLU, _he_init, conv3x3


def is_reversible(block: nn.Module) -> bool:
    """Whether ``block`` rebuilds its input from its output (has ``inverse``)."""
    return callable(getattr(block, "inverse", None))


def _residual_branch(channels: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(channels, channels), nn.BatchNorm2d(channels), nn.ReLU(),
                         conv3x3(channels, channels), nn.BatchNorm2d(channels))


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = t.to(torch.promote_types(t.dtype, torch.float32))  # the coupling sums in float32 at least (see above)
    return t.chunk(2, dim=1)


class ReversibleBlock(nn.Module):
    """RevNet's additive coupling on ``channels`` channels (an even number)."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"a reversible block splits its channels in two; {channels} is odd")
        self.f = _residual_branch(channels // 2)
        self.g = _residual_branch(channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = _halves(x)
        y1 = x1 + self.f(x2).to(x1.dtype)
        y2 = x2 + self.g(y1).to(x2.dtype)
        return torch.cat([y1, y2], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input whose forward (at the current weights, in the current
        mode) is ``y``."""
        y1, y2 = _halves(y)
        x2 = y2 - self.g(y1).to(y2.dtype)
        x1 = y1 - self.f(x2).to(y1.dtype)
        return torch.cat([x1, x2], dim=1)


def _reversible_or(downsampling: type[nn.Module]):
    """make_block for residual_stages: a reversible block where the shape is
    kept, ``downsampling`` (the ResNet's block) where it changes."""
    def make(cin: int, cout: int, stride: int) -> nn.Module:
        return ReversibleBlock(cout) if stride == 1 and cin == cout else downsampling(cin, cout, stride)
    return make


def revnet_cifar(depth: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 name: str | None = None) -> BlockModel:
    """The CIFAR ResNet-``depth``'s block list with its shape-keeping blocks reversible."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR RevNet depth must be 6n+2, got {depth}")
    layers, width = residual_stages(widths[0], widths, (depth - 2) // 6, _reversible_or(BasicBlockA))
    blocks = [("stem", ConvBNReLU(3, widths[0])), *layers, ("head", ClassifierHead(width, num_classes))]
    model = BlockModel(blocks, name=name or f"revnet{depth}")
    model.apply(_he_init)
    return model


def revnet18(num_classes: int = 10) -> BlockModel:
    """ResNet-18 (CIFAR stem) with its shape-keeping blocks reversible: PETRA's RevNet-18."""
    layers, width = residual_stages(64, (64, 128, 256, 512), 2, _reversible_or(BasicBlockB))
    return BlockModel([("stem", ConvBNReLU(3, 64)), *layers, ("head", ClassifierHead(width, num_classes))],
                      name="revnet18")
