"""Backpropagation: batch t goes forward through every stage, the loss's
gradient back through every stage, and every stage steps, all in iteration t.
The reference every other method is measured against."""
from fdgbench.method import Method, register
from fdgbench.schedule import stage_plan
from fdgbench.stage import StageWorker


@register
class BP(Method):
    name = "bp"
    order = 10
    summary = "backpropagation: forward, backward and update locked across all stages"
    breaks = ()

    def schedule(self, num_stages, t):
        return tuple(stage_plan(k, num_stages, forward=t, backward=t, forward_latency=0, backward_latency=0,
                                backward_first=False) for k in range(num_stages))

    def make_worker(self, ctx):
        return StageWorker(ctx)
