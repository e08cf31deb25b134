"""DGL, decoupled greedy learning (Belilovsky et al., ICML 2020).

Every stage k < K-1 has an auxiliary classifier (DGL's "MLP-SR", built from
the boundary's shape) and trains on its own cross-entropy; its output,
computed before its step, is detached before the next stage, so no gradient
crosses a boundary. The last stage trains on the real loss, and test error
is the last stage's classifier. Auxiliary nets have their own SGD on the
stage's schedule. ``sync`` and ``pipelined`` give the same numbers (only the
timing differs), since no stage's computation depends on another's state.
"""
import math

import torch.nn.functional as F
from torch import nn

from fdgbench.method import Method, register
from fdgbench.optim import StageOptimizer
from fdgbench.schedule import local_plan
from fdgbench.stage import MeanMeter, StageWorker, upcast_half

from .variants import VARIANT, forward_batch


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


class LocalLossWorker(StageWorker):
    """A stage trained on the cross-entropy of its auxiliary classifier ``aux``
    (default: DGL's, built from the boundary's shape)."""

    def __init__(self, ctx, aux: nn.Module | None = None):
        super().__init__(ctx, input_grad=False)
        if aux is None:
            with ctx.seeded():
                aux = aux_classifier(ctx.output_shape, ctx.num_classes)
        self.aux = aux.to(ctx.device, ctx.dtype, memory_format=ctx.memory_format)
        self.add_local("aux", self.aux, StageOptimizer(list(self.aux.parameters()), ctx.optim))
        self.meters = {"aux_loss": MeanMeter(), "aux_error": MeanMeter()}

    def forward(self, batch, x, labels):
        out = self.store.forward(batch, x)
        with self.ctx.autocast():
            logits = self.aux(out)
        loss = F.cross_entropy(upcast_half(logits), labels)
        self.store.set_root(batch, loss)
        self.meters["aux_loss"].add(loss)
        self.meters["aux_error"].add(100.0 * (logits.argmax(1) != labels).float().mean())
        return out.detach()

    def local_backward(self, batch):
        self.store.backward(batch, None)
        return None


@register
class DGL(Method):
    name = "dgl"
    order = 50
    summary = "greedy local learning: every stage trains on its own auxiliary classifier"
    breaks = ("backward", "update")
    options = (VARIANT,)

    def schedule(self, num_stages, t):
        return tuple(local_plan(k, num_stages, *forward_batch(self.variant, k, t), send_grad=False)
                     for k in range(num_stages))

    def make_worker(self, ctx):
        return StageWorker(ctx, input_grad=False) if ctx.is_last else LocalLossWorker(ctx)
