"""`bench memory`: per-stage memory measured in a few real iterations beside the start-of-run estimate."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..data import synthetic_dataset
from ..config import RunConfig
from ..plan import check_config
from ..memory import OVERHEAD, RUNTIME_BYTES, GiB, MiB, estimate, one_process_peak
from ..train import build_run


def bench_memory(model: str, splits: int, batch_size: int, threads: int | None,
                 methods: list[tuple[str, dict[str, Any]]], rss: bool = False,
                 expected_at: int | None = None) -> None:
    """Per stage, for BP and each method and staleness mode: the bytes
    measured in real iterations on the CPU (sequential engine, synthetic
    data, saved-tensor hooks until the pipeline has filled) beside the
    estimate the start-of-run guard uses (memory.estimate), and their ratio.
    ``rss``: also each row's process-level growth, the peak resident memory
    of a fresh process over its training window less its resident memory
    before, against the expected total: what the guard's OVERHEAD covers.
    ``expected_at``: also the estimate at that batch per stage and in all
    (measure at a batch the machine can afford, read off a larger one)."""
    import gc

    # Every config checked into its plan first: a bad K or batch is one error line, not one after the table's header.
    plans = [check_config(RunConfig(method=method, method_options=options, model=model, splits=splits,
                                    dataset="synthetic", batch_size=batch_size, threads=threads))
             for method, options in methods]
    data = _data(batch_size)
    image_shape = tuple(data.train_images.shape[1:])
    click.echo(f"{model}, K={splits}, batch {batch_size}, CPU, synthetic data: MiB per stage, measured / expected "
               f"= ratio (xN = batches whose graph the stage holds at its peak)")
    click.echo("measured: storages autograd saved for the backward (each once) + inputs/outputs + what the mode "
               "keeps, at the peak over the run's memory window (the pipeline's fill twice, and until every buffer is "
               "full), + weights, grads, optimizer state")
    click.echo(f"expected: (bytes one batch keeps, fitted on batches 2 and 4) x batches held (from the schedule) "
               f"+ state; the guard budgets {OVERHEAD}x this for backward buffers and the allocator")
    click.echo("one process: expected peak of one process running every stage (sequential engine): every stage's "
               "state + the most the stages hold at one moment of the schedule")
    if rss:
        click.echo(f"rss: a fresh process per row, its peak resident memory over the same iterations (VmHWM, reset "
                   f"when training starts) less its resident memory then, / the expected total; the guard budgets "
                   f"{OVERHEAD}x (on a small net the ratio is mostly what any first iteration adds, kernel "
                   f"workspaces and allocator arenas, which the guard's {RUNTIME_BYTES / GiB:.1f} GiB per process for "
                   f"torch covers)")
    if expected_at:
        click.echo(f"at {expected_at}: the expected MiB per stage / in all at batch {expected_at}, the same fit")
    header = (f"{'method':<12}" + "".join(f"{'stage ' + str(k):>30}" for k in range(splits)) + f"{'total':>24}"
              + f"{'one process':>14}" + (f"{'rss / expected':>22}" if rss else ""))
    click.echo(header)
    for (method, options), plan in zip(methods, plans):
        expected = estimate(plan, image_shape, 10)
        trainer = build_run(plan, dataset=data)
        _train_memory_window(trainer)
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
        growth = _in_fresh_process(_training_rss_growth, plan.cfg) if rss else None
        click.echo(f"{label:<12}" + "".join(f"{c:>30}" for c in cells)
                   + f"{total_m / MiB:>10.1f} / {total_e / MiB:>9.1f}{together / MiB:>14.1f}"
                   + (f"{growth / MiB:>10.1f} = {growth / total_e:4.2f}x" if rss else "")
                   + (_at_batch(expected, expected_at) if expected_at else ""))


def _data(batch_size: int):
    """Synthetic images for a row: two batches to train on, one to test."""
    return synthetic_dataset(10, train=batch_size * 2, test=batch_size)


def _train_memory_window(trainer) -> None:
    """The run's own memory window, hooks armed as in a run: the pipeline's
    fill twice over, and until every input buffer is full."""
    for t in range(trainer.memory.window):
        trainer.memory.watch(t)
        trainer.engine.run_iteration(t)


def _at_batch(expected: list, batch: int) -> str:
    """The estimate read off at ``batch``: each stage's MiB and their sum."""
    per_stage = [e.peak_bytes(batch) for e in expected]
    return f"   at {batch}: " + " / ".join(f"{b / MiB:.1f}" for b in per_stage) + f" = {sum(per_stage) / MiB:.1f}"


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a new process: a process's resident memory keeps
    the pages an earlier row's allocator held, so each row gets its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _training_rss_growth(cfg: RunConfig) -> int:
    """Bytes a run's process grows by over its memory window: the peak
    resident memory since training began less the resident memory then
    (Linux: writing 5 to clear_refs resets the peak)."""
    import gc

    trainer = build_run(check_config(cfg), dataset=_data(cfg.batch_size))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    _train_memory_window(trainer)
    return _status_bytes("VmHWM") - before


# -- profiles, the link, and the speedup benchmark ----------------------------------------------
