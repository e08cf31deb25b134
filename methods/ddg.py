"""DDG, decoupled parallel backpropagation (Huo et al., ICML 2018).

The forward is locked: batch t passes through every stage in iteration t.
The backward is decoupled: stage k back-propagates batch t-(K-1-k) with the
gradient stage k+1 sent at t-1 (never one made in the same iteration); the
last stage does plain backprop on batch t. Every stage steps after its
backward. The stored graph is read under --staleness legacy or stash.
``--predict spectrain``: stage k's forward runs at its weights predicted
K-1-k updates ahead (fdgbench.stage.StageWorker._predicted_weights).
"""
from fdgbench.method import PREDICT, STALENESS, Method, MethodOption, prediction_delay, register
from fdgbench.schedule import stage_plan
from fdgbench.stage import StageWorker

DDG_STALENESS = MethodOption(STALENESS.name, str, "legacy", "legacy (authors' PyTorch-1.0 behaviour) or stash "
                             "(weights of the forward); recomputing is the FR method", choices=("legacy", "stash"))


@register
class DDG(Method):
    name = "ddg"
    order = 30
    summary = "decoupled backward: locked forward, stage k's gradient is K-1-k iterations old"
    breaks = ("backward", "update")
    options = (DDG_STALENESS, PREDICT)

    def schedule(self, num_stages, t):
        return tuple(stage_plan(k, num_stages, forward=t, backward=t - (num_stages - 1 - k), forward_latency=0,
                                backward_latency=1, backward_first=False) for k in range(num_stages))

    def make_worker(self, ctx):
        return StageWorker(ctx, staleness=self.staleness, delayed=not ctx.is_last,
                           predict_steps=prediction_delay(self, ctx))
