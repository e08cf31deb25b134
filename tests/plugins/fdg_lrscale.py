"""FDG with a learning rate per stage: stage k's is multiplied by
stage_lr_decay^(K-1-k), so the early stages, whose gradients are the
stalest, take the smallest steps. A method plug-in, loaded with
`fdgbench --plugin fdg_lrscale.py run --method fdg_lrscale --stage-lr-decay 0.5`."""
from fdgbench.method import MethodOption, in_unit_interval, register
from fdgbench.stage import StageWorker
from methods.fdg import FDG

STAGE_LR_DECAY = MethodOption("stage_lr_decay", float, 1.0, "stage k's learning rate is multiplied by "
                              "stage_lr_decay^(K-1-k) (the stalest gradients take the smallest steps)",
                              check=in_unit_interval)


@register
class FDGLRScale(FDG):
    name = "fdg_lrscale"
    summary = "FDG with stage k's learning rate scaled by stage_lr_decay^(K-1-k)"
    options = FDG.options + (STAGE_LR_DECAY,)  # --beta and --staleness as FDG has them, and its own

    # The schedule is FDG's; only the workers differ.
    def make_worker(self, ctx):
        return StageWorker(ctx, staleness=self.staleness, delayed=not ctx.is_last,
                           grad_scale=1.0 if ctx.is_last else self.beta,
                           lr_scale=self.stage_lr_decay ** (ctx.num_stages - 1 - ctx.index))
