"""FR, features replay (Huo et al., NeurIPS 2018).

DDG's schedule, but stage k keeps only its (stale) input: before its step it
re-runs its forward on that input with its current weights, in train mode,
and back-propagates the delayed gradient through the recomputation. The
first forward of stages 0..K-2 builds no graph; BN running statistics see
both forwards, as in the authors' code.

The authors' code also used Nesterov momentum (--nesterov) and gave stage 0
twice the learning rate (--first-stage-lr-scale 2); both are off by default.
"""
from fdgbench.method import Method, MethodOption, positive, register
from fdgbench.stage import StageWorker

from .ddg import DDG


FIRST_STAGE_LR_SCALE = MethodOption("first_stage_lr_scale", float, 1.0, "multiply stage 0's learning rate "
                                    "(the FR authors' code used 2)", check=positive, affects_time=False)


@register
class FR(Method):
    name = "fr"
    order = 40
    summary = "features replay: DDG's delays, the stale batch's forward recomputed before the backward"
    breaks = ("backward", "update")
    options = (FIRST_STAGE_LR_SCALE,)

    schedule = DDG.schedule

    def replays_forward(self):
        return True

    def make_worker(self, ctx):
        return StageWorker(ctx, staleness="replay", delayed=not ctx.is_last,
                           lr_scale=self.first_stage_lr_scale if ctx.is_first else 1.0)
