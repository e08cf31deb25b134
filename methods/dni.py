"""DNI and cDNI, decoupled neural interfaces with synthetic gradients
(Jaderberg et al., ICML 2017).

At each boundary k < K-1 a synthetic-gradient model M_k predicts dL/dh_k
from h_k (cDNI: and the one-hot label); stage k back-propagates that
prediction at once and steps (LOCAL, then UPDATE), and sends the resulting
input gradient to stage k-1. When the gradient stage k+1 computed for a batch
arrives (itself built from M_{k+1} unless k+1 is last: bootstrapping), M_k
is trained on it (BACKWARD): loss = sum over C*H*W of the squared error,
averaged over the batch, with its own Adam optimizer (--sg-lr), on a fresh
prediction from the stored h_k. Without labels DNI is known to do poorly on
CIFAR, so cdni is the one to compare.

Scale: M_k predicts the gradient of the batch-*summed* loss (B dL/dh, O(1)
per sample) and its output is divided by B before use. That is the same
model as predicting dL/dh of the mean loss, reparametrised; without it,
Adam's fixed step sizes make a zero-initialised M_k overshoot targets of
order 1/B and the stages diverge (measured on the tiny test net: training
loss 4 -> 250 in ten epochs). The reported sg_loss is in these units.
"""
import torch
from torch import nn

from fdgbench.checkpoint import to_device
from fdgbench.method import Method, MethodOption, positive, register
from fdgbench.schedule import local_plan
from fdgbench.stage import MeanMeter, StageWorker

from .variants import VARIANT, forward_batch


SG_LR = MethodOption("sg_lr", float, 1e-4, "Adam learning rate of the synthetic-gradient models", check=positive,
                     affects_time=False)
SG_KERNEL = MethodOption("sg_kernel", int, 5, "conv kernel of the synthetic-gradient models (5 as in the "
                         "paper, or 3)", check=lambda k: None if k in (3, 5) else f"must be 3 or 5, got {k}")


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


class SyntheticGradientWorker(StageWorker):
    def __init__(self, ctx, conditioned: bool, sg_lr: float, kernel: int):
        super().__init__(ctx)
        with ctx.seeded():
            self.sg = SyntheticGradient(ctx.output_shape, ctx.num_classes, conditioned, kernel).to(
                ctx.device, memory_format=ctx.memory_format)
        # Adam at its own fixed lr, stepped when the true gradient arrives (backward), not with the stage.
        self.sg_optimizer = torch.optim.Adam(self.sg.parameters(), lr=sg_lr)
        self.add_local("sg", self.sg, self.sg_optimizer, follows_schedule=False, steps_with_stage=False)
        self.meters = {"sg_loss": MeanMeter()}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, batch, x, labels):
        out = super().forward(batch, x, labels)
        self._outputs[batch] = (out, labels)
        return out

    def local_backward(self, batch):
        h, labels = self._outputs[batch]
        with torch.no_grad(), self.ctx.autocast():
            synthetic = self.sg(h, labels).to(h.dtype) / h.shape[0]
        return super().backward(batch, synthetic)

    def backward(self, batch, grad):
        """The true (bootstrapped) gradient for ``batch`` arrived: fit M_k to it."""
        h, labels = self._outputs.pop(batch)
        with self.ctx.autocast():
            predicted = self.sg(h, labels)
        batch_size = h.shape[0]
        loss = (predicted.float() - batch_size * grad.float()).square().sum() / batch_size
        self.sg_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sg_optimizer.step()
        self.meters["sg_loss"].add(loss)
        return None

    def checkpoint_state(self):  # the outputs still waiting for their true gradient
        return {**super().checkpoint_state(), "outputs": self._outputs}

    def restore_state(self, state):
        super().restore_state(state)
        self._outputs = to_device(state["outputs"], self.device)


@register
class DNI(Method):
    name = "dni"
    order = 60
    summary = "synthetic gradients predicted from the activation alone (no labels)"
    breaks = ("backward", "update")
    options = (VARIANT, SG_LR, SG_KERNEL)
    conditioned = False

    def schedule(self, num_stages, t):
        plans = []
        for k in range(num_stages):
            batch, latency = forward_batch(self.variant, k, t)
            # The gradient for stage k's output arrives from stage k+1: in the
            # same iteration (sync), or one iteration after k+1 forwarded it.
            target = t if self.variant == "sync" else t - k - 2
            plans.append(local_plan(k, num_stages, batch, latency, send_grad=True, target=target))
        return tuple(plans)

    def make_worker(self, ctx):
        if ctx.is_last:
            return StageWorker(ctx)
        return SyntheticGradientWorker(ctx, self.conditioned, self.sg_lr, self.sg_kernel)


@register
class CDNI(DNI):
    name = "cdni"
    summary = "synthetic gradients conditioned on the label (cDNI), the DNI variant that works on CIFAR"
    conditioned = True
