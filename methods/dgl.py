"""DGL, decoupled greedy learning (Belilovsky et al., ICML 2020).

Every stage k < K-1 has an auxiliary classifier (DGL's "MLP-SR", built from
the boundary's shape) and trains on its own cross-entropy; its output,
computed before its step, is detached before the next stage, so no gradient
crosses a boundary. The last stage trains on the real loss, and test error
is the last stage's classifier. Auxiliary nets have their own SGD on the
stage's schedule. ``sync`` and ``pipelined`` give the same numbers (only the
timing differs), since no stage's computation depends on another's state.
"""
import torch.nn.functional as F

from fdgbench.auxnets import aux_classifier
from fdgbench.method import Method, register
from fdgbench.optim import StageOptimizer
from fdgbench.schedule import local_plan
from fdgbench.stage import MeanMeter, StageWorker

from .variants import VARIANT, forward_batch


class LocalLossWorker(StageWorker):
    def __init__(self, ctx):
        super().__init__(ctx, input_grad=False)
        with ctx.seeded():
            self.aux = aux_classifier(ctx.output_shape, ctx.num_classes).to(ctx.device, memory_format=ctx.memory_format)
        self.aux_optimizer = StageOptimizer(list(self.aux.parameters()), ctx.optim)
        self.meters = {"aux_loss": MeanMeter(), "aux_error": MeanMeter()}

    def forward(self, batch, x, labels):
        out = self.store.forward(batch, x)
        with self.ctx.autocast():
            logits = self.aux(out)
        loss = F.cross_entropy(logits.float(), labels)
        self.store.set_root(batch, loss)
        self.meters["aux_loss"].add(loss)
        self.meters["aux_error"].add(100.0 * (logits.argmax(1) != labels).float().mean())
        return out.detach()

    def local_backward(self, batch):
        self.store.backward(batch, None)
        return None

    def update(self):
        super().update()
        self.aux_optimizer.step()

    def set_lr(self, lr):
        super().set_lr(lr)
        self.aux_optimizer.set_lr(lr)

    def checkpoint_state(self):
        return {**super().checkpoint_state(), "aux": self.aux.state_dict(),
                "aux_optimizer": self.aux_optimizer.state_dict()}

    def restore_state(self, state):
        super().restore_state(state)
        self.aux.load_state_dict(state["aux"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer"])


@register
class DGL(Method):
    name = "dgl"
    summary = "greedy local learning: every stage trains on its own auxiliary classifier"
    breaks = ("backward", "update")
    options = (VARIANT,)

    def schedule(self, num_stages, t):
        return tuple(local_plan(k, num_stages, *forward_batch(self.variant, k, t), send_grad=False)
                     for k in range(num_stages))

    def make_worker(self, ctx):
        return StageWorker(ctx, input_grad=False) if ctx.is_last else LocalLossWorker(ctx)
