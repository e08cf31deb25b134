"""ADL, accumulated decoupled learning (Zhuang et al., ICML 2021).

FDG's schedule and gradient shrinking, with module-wise gradient
accumulation: a stage steps only after every M-th backward (--accumulate M),
so its weights change M times less often and a delayed gradient is fewer
updates stale. Gradients are summed, as in the authors' code, with the
learning rate unchanged; --accumulate-mean averages them instead.
``--predict spectrain`` predicts a stage's weights by its mean delay in
updates (batches applied at one update are of different ages).
"""
from fdgbench.method import MethodOption, at_least_one, prediction_delay, register
from fdgbench.schedule import Op
from fdgbench.stage import StageWorker

from .fdg import FDG


ACCUMULATE = MethodOption("accumulate", int, 2, "backward passes per step (M)", check=at_least_one)
ACCUMULATE_MEAN = MethodOption("accumulate_mean", bool, False, "average the M accumulated gradients instead "
                               "of summing them", affects_time=False)


def every_mth_update(plans, num_stages: int, t: int, m: int):
    """FDG's iteration ``plans`` with each stage's UPDATE kept only after
    every ``m``-th backward: stage k back-propagates batch t-2(K-1)+k and
    steps after batches m-1, 2m-1, ..."""
    return tuple(plan if (t - 2 * (num_stages - 1) + k + 1) % m == 0
                 else tuple(a for a in plan if a.op is not Op.UPDATE)
                 for k, plan in enumerate(plans))


class AccumulatingWorker(StageWorker):
    def __init__(self, ctx, average_over: int, **kwargs):
        super().__init__(ctx, **kwargs)
        self.average_over = average_over

    def update(self):
        if self.average_over > 1:
            for p in self.optimizer.params:
                if p.grad is not None:
                    p.grad.div_(self.average_over)
        super().update()


@register
class ADL(FDG):
    name = "adl"
    order = 70
    summary = "FDG with gradients accumulated over M backward passes per step"
    options = FDG.options + (ACCUMULATE, ACCUMULATE_MEAN)

    def schedule(self, num_stages, t):
        return every_mth_update(super().schedule(num_stages, t), num_stages, t, self.accumulate)

    def make_worker(self, ctx):
        return AccumulatingWorker(ctx, self.accumulate if self.accumulate_mean else 1, staleness=self.staleness,
                                  delayed=not ctx.is_last, grad_scale=1.0 if ctx.is_last else self.beta,
                                  predict_steps=prediction_delay(self, ctx))
