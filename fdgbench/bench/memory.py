"""`bench memory`: per-stage memory measured in a few real iterations beside the start-of-run estimate."""
from __future__ import annotations

from typing import Any

import click

from ..data import synthetic_dataset
from ..config import RunConfig
from ..plan import check_config
from ..train import build_run




def bench_memory(model: str, splits: int, batch_size: int, threads: int | None,
                 methods: list[tuple[str, dict[str, Any]]]) -> None:
    """Per stage, for BP and each method and staleness mode: the bytes
    measured in real iterations on the CPU (sequential engine, synthetic
    data, saved-tensor hooks until the pipeline has filled) beside the
    estimate the start-of-run guard uses (memory.estimate), and their ratio."""
    import gc

    from ..memory import MiB, buffer_fill, estimate, one_process_peak

    # Every config checked into its plan first: a bad K or batch is one error line, not one after the table's header.
    plans = [check_config(RunConfig(method=method, method_options=options, model=model, splits=splits,
                                    dataset="synthetic", batch_size=batch_size, threads=threads))
             for method, options in methods]
    data = synthetic_dataset(10, train=batch_size * 2, test=batch_size)
    image_shape = tuple(data.train_images.shape[1:])
    click.echo(f"{model}, K={splits}, batch {batch_size}, CPU, synthetic data: MiB per stage, measured / expected "
               f"= ratio (xN = batches whose graph the stage holds at its peak)")
    click.echo("measured: storages autograd saved for the backward (each once) + inputs/outputs + what the mode "
               "keeps, at the peak over the pipeline's fill and 2 more iterations, + weights, grads, optimizer state")
    click.echo("expected: (bytes one batch keeps, fitted on batches 2 and 4) x batches held (from the schedule) "
               "+ state; the guard budgets 1.35x this for backward buffers and the allocator")
    click.echo("one process: expected peak of one process running every stage (sequential engine): every stage's "
               "state + the most the stages hold at one moment of the schedule")
    header = (f"{'method':<12}" + "".join(f"{'stage ' + str(k):>30}" for k in range(splits)) + f"{'total':>24}"
              + f"{'one process':>14}")
    click.echo(header)
    for (method, options), plan in zip(methods, plans):
        expected = estimate(plan, image_shape, 10)
        trainer = build_run(plan, dataset=data)
        # The pipeline's fill and 2 more iterations, and until every input buffer is full.
        for t in range(trainer.hold_span + 3 + buffer_fill(trainer.workers, trainer.stage_indices)):
            trainer.memory.watch(t)
            trainer.engine.run_iteration(t)
        measured = trainer.memory.record()
        del trainer
        gc.collect()
        cells, total_m, total_e = [], 0.0, 0.0
        for e in expected:
            m, x = measured[f"stage{e.index}_memory_bytes"], e.peak_bytes(batch_size)
            total_m, total_e = total_m + m, total_e + x
            cells.append(f"{m / MiB:9.1f} / {x / MiB:9.1f} = {m / x:4.2f} x{e.batches()}")
        label = " ".join([method, *(str(v) for v in options.values())])
        together = one_process_peak(expected, plan.method.schedule, batch_size)
        click.echo(f"{label:<12}" + "".join(f"{c:>30}" for c in cells)
                   + f"{total_m / MiB:>10.1f} / {total_e / MiB:>9.1f}{together / MiB:>14.1f}")


# -- profiles, the link, and the speedup benchmark ----------------------------------------------
