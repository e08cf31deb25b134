"""FDG, fully decoupled learning with delayed gradients (Zhuang et al., TNNLS
2022, arXiv:1906.09108).

All stages work at once on different batches. At iteration t stage k forwards
batch t-k (the activation stage k-1 sent at t-1) and back-propagates batch
t-2(K-1)+k (the gradient stage k+1 sent at t-1), so its gradient is 2(K-1-k)
iterations old. A stage k < K-1 first back-propagates the stale batch and
steps, then forwards the new one; the last stage forwards, takes the loss,
back-propagates and steps. Every stage k < K-1 multiplies the received
gradient by beta (gradient shrinking), so stage k's gradient carries
beta^(K-1-k). The pipeline runs on across epochs, never drained.

``--predict spectrain``: stage k's forward runs at its weights predicted
2(K-1-k) - 1 updates ahead (fdgbench.stage.StageWorker._predicted_weights).
"""
from fdgbench.method import BETA, PREDICT, STALENESS, Method, prediction_delay, register
from fdgbench.schedule import stage_plan
from fdgbench.stage import StageWorker


def fdg_plans(num_stages: int, t: int):
    """FDG's iteration t: stage k forwards batch t-k and back-propagates batch
    t-2(K-1)+k, backward first, every message one iteration late (PETRA runs
    the same pipeline)."""
    last = num_stages - 1
    return tuple(stage_plan(k, num_stages, forward=t - k, backward=t - 2 * last + k, forward_latency=1,
                            backward_latency=1, backward_first=True) for k in range(num_stages))


@register
class FDG(Method):
    name = "fdg"
    order = 20
    summary = "fully decoupled: pipelined forward, delayed gradients shrunk by beta"
    breaks = ("forward", "backward", "update")
    options = (BETA, STALENESS, PREDICT)

    def schedule(self, num_stages, t):
        return fdg_plans(num_stages, t)

    def make_worker(self, ctx):
        return StageWorker(ctx, staleness=self.staleness, delayed=not ctx.is_last,
                           grad_scale=1.0 if ctx.is_last else self.beta, predict_steps=prediction_delay(self, ctx))
