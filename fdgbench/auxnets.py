"""Auxiliary networks that methods attach at a stage boundary, built from the
boundary's shape so they work for any model and K."""
from __future__ import annotations

import math

import torch
from torch import nn


def _conv_bn_relu_1x1(channels: int) -> list[nn.Module]:
    return [nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]


def _linear_bn_relu(width: int) -> list[nn.Module]:
    return [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]


def aux_classifier(shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """DGL's reference auxiliary net ("MLP-SR"): average-pool to ceil(H/4),
    three 1x1 conv + BN + ReLU at the input's width C, average-pool to 2x2,
    three Linear(4C, 4C) + BN1d + ReLU, and a linear classifier."""
    if len(shape) != 3:
        raise ValueError(f"auxiliary classifiers need a (C, H, W) boundary, got {shape}")
    c, h, _ = shape
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(math.ceil(h / 4)), *_conv_bn_relu_1x1(c), *_conv_bn_relu_1x1(c), *_conv_bn_relu_1x1(c),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        *_linear_bn_relu(4 * c), *_linear_bn_relu(4 * c), *_linear_bn_relu(4 * c), nn.Linear(4 * c, num_classes))


class SyntheticGradient(nn.Module):
    """DNI's synthetic-gradient model: predicts dL/dh from h (and, for cDNI,
    the one-hot label as extra input channels). For conv activations, three
    resolution-preserving convs (BN + ReLU after the first two); the last
    conv's weight and bias start at zero, so the first predictions are zero."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, conditioned: bool, kernel: int = 5):
        super().__init__()
        self.num_classes = num_classes if conditioned else 0
        c = shape[0]
        if len(shape) == 3:
            pad = kernel // 2

            def layer(cin: int) -> nn.Conv2d:
                return nn.Conv2d(cin, c, kernel, padding=pad)

            self.net = nn.Sequential(layer(c + self.num_classes), nn.BatchNorm2d(c), nn.ReLU(),
                                     layer(c), nn.BatchNorm2d(c), nn.ReLU(), layer(c))
        elif len(shape) == 1:
            self.net = nn.Sequential(nn.Linear(c + self.num_classes, c), nn.BatchNorm1d(c), nn.ReLU(),
                                     nn.Linear(c, c), nn.BatchNorm1d(c), nn.ReLU(), nn.Linear(c, c))
        else:
            raise ValueError(f"synthetic gradients need a (C, H, W) or (C,) boundary, got {shape}")
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_classes:
            onehot = nn.functional.one_hot(labels, self.num_classes).to(h.dtype)
            if h.dim() == 4:
                onehot = onehot[:, :, None, None].expand(-1, -1, *h.shape[2:])
            h = torch.cat([h, onehot], dim=1)
        return self.net(h)
