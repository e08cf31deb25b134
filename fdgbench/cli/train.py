"""`fdgbench run` and `fdgbench compare`: one config, or several methods on one budget."""
from __future__ import annotations

from typing import Any

import click

from ..config import RunConfig
from ..errors import DivergedError
from ..execute import RunOptions, train_run
from ..plan import check_config
from ..runs import RunDirectory

from .group import cli
from .options import MethodOptionsCommand, is_primary, method_entries, run_config, run_options


@cli.command(cls=MethodOptionsCommand)
@click.option("--method", default="fdg", show_default=True, help="see `fdgbench list methods`")
@run_options
def run(method: str, **kw: Any) -> None:
    """Train one configuration (paper defaults for everything not given)."""
    cfg = run_config(method, kw)
    summary, path, cached = train_run(check_config(cfg), RunOptions.from_options(kw))
    if not is_primary():
        return
    note = " (already done; --force reruns)" if cached else ""
    replicas = f" R={cfg.replicas}" if cfg.replicas > 1 else ""
    click.echo(f"{cfg.method} {cfg.model} K={cfg.splits}{replicas}: final test error "
               f"{summary['final_test_error']:.2f}%, "
               f"best {summary['best_test_error']:.2f}% (epoch {summary['best_epoch']}), "
               f"{summary['status']}{note} -> {path}")


def warmup_text(cfg: RunConfig) -> str:
    """The warm-up every row of a comparison shares, for its header: the default one depends on the
    budget, so the table says which it had (nothing where there is none, as in the demo)."""
    if not cfg.warmup_epochs:
        return ""
    return f", {cfg.warmup} warm-up over {cfg.warmup_epochs} epoch{'s' if cfg.warmup_epochs > 1 else ''}"


DEMO = dict(model="resnet20", splits=2, train_subset=10000, test_subset=2000, epochs=4)


@cli.command(cls=MethodOptionsCommand)
@click.option("--methods", default="bp,fdg", show_default=True,
              help="comma-separated methods to compare, each with options of its own in brackets if wanted: "
                   "fdg,fdg[beta=0.5],ddg[staleness=stash] (a method flag such as --beta applies to every one)")
@run_options
@click.pass_context
def compare(ctx: click.Context, methods: str, **kw: Any) -> None:
    """Train several methods on the same budget and print a table.

    With no options this is the README's demo: BP vs FDG (K=2) on ResNet-20,
    CIFAR-10 subset (10,000 train / 2,000 test images), 4 epochs, a few minutes on a laptop CPU.
    """
    def is_default(key: str) -> bool:
        return ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT

    for key, value in DEMO.items():  # the demo's budget unless the user set it
        # The subset sizes are CIFAR-10's; another dataset keeps its own size.
        if is_default(key) and (is_default("dataset") or not key.endswith("_subset")):
            kw[key] = value
    # An entry's own options override the flags given to all: the same keys a config reads its options from.
    # Every config is checked (resolved into its plan) before the first one trains.
    plans = [check_config(run_config(name, {**kw, **own})) for name, own in method_entries(methods)]
    datasets: dict[str, Any] = {}
    rows = []
    diverged = []
    options = RunOptions.from_options(kw)
    for plan in plans:
        try:
            summary, path, cached = train_run(plan, options, datasets)
        except DivergedError as exc:  # recorded in its run directory; the comparison goes on
            click.echo(f"diverged: {exc}", err=True)
            path = plan.directory(kw["out"]).path
            summary, cached = RunDirectory(path).read_json("summary.json"), False
            diverged.append(plan.cfg.method)
        opts = ",".join(f"{k}={v}" for k, v in summary["method_options"].items())
        method = plan.cfg.method
        rows.append((f"{method}({opts})" if opts else method, summary, path, cached))
    first = rows[0][1]
    click.echo(f"\n{first['model']} ({first['parameters']:,} params), K={first['splits']}, {first['dataset']}, "
               f"{first['steps']} iterations of batch {kw['batch_size']}, seed {kw['seed']}{warmup_text(plans[0].cfg)}")
    width = max(len("method"), *(len(r[0]) for r in rows))
    click.echo(f"{'method':<{width}}  {'final err %':>11} {'best err %':>10} {'img/s':>7}  run directory")
    for label, s, path, cached in rows:
        rate = f"{s['images_per_s']:.0f}" if s.get("images_per_s") else "-"
        final = f"{s['final_test_error']:.2f}" if s["final_test_error"] is not None else "-"
        best = f"{s['best_test_error']:.2f}" if s["best_test_error"] is not None else "-"
        click.echo(f"{label:<{width}}  {final:>11} {best:>10} {rate:>7}  {path}{' (cached)' if cached else ''}"
                   f"{'' if s['status'] == 'finished' else '  ' + s['status'].upper()}")
    click.echo("test error in %: final = after the last epoch, best = lowest over epochs; one seed each. "
               f"img/s = training images per second ({kw['engine']} engine"
               f"{', one rank per stage' if kw['engine'] == 'distributed' else ', one process'}).")
    if diverged:
        raise DivergedError(f"{', '.join(diverged)} diverged (see the table)")


