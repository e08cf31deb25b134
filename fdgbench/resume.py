"""A run's checkpoint after an epoch, and a run continued from one: every
process writes its part (its stages, optimizers, held batches and RNG
states), rank 0 points latest.json at them (checkpoint.py is the file
format); a resumed run restores them and the records of the epochs before."""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from . import checkpoint
from .engines.launch import from_rank0, is_communication_error
from .errors import UserError
from .runs import RunDirectory, environment

if TYPE_CHECKING:
    from .train import Run


def save_checkpoint(run: Run, directory: RunDirectory, epochs_done: int, next_t: int) -> None:
    """Every process writes its part, then rank 0 points latest.json at
    them, then each removes its older parts (checkpoint.py)."""
    start = time.perf_counter()
    state = {"epoch": epochs_done, "iteration": next_t, "engine": run.engine.checkpoint_state(),
             "rng": checkpoint.rng_state(run.devices), checkpoint.HASH: run.config_hash}
    checkpoint.save_part(directory.path, epochs_done, run.process, state)
    run.barrier()
    if run.engine.is_primary:
        checkpoint.publish(directory.path, {
            "epoch": epochs_done, "iteration": next_t,
            "ranks": run.processes, checkpoint.HASH: run.config_hash,
            "partition": {"starts": list(run.partition.starts), "strategy": run.partition.strategy},
            "written": datetime.now(timezone.utc).isoformat()})
    run.barrier()
    checkpoint.prune(directory.path, epochs_done, run.process)
    run.checkpoint_seconds += time.perf_counter() - start


def restore(run: Run, directory: RunDirectory) -> list[dict[str, Any]]:
    """Load this process's part of the checkpoint ``run.resume`` names;
    returns the history of the epochs before it (rank 0's records)."""
    info = run.resume
    epochs_done, next_t = int(info["epoch"]), int(info["iteration"])
    if info["ranks"] != run.processes:
        raise UserError(f"the checkpoint in {directory.path} was written by {info['ranks']} process(es), "
                        f"this run has {run.processes}; --force starts the run over")
    if next_t != epochs_done * run.steps_per_epoch:
        raise UserError(f"the checkpoint in {directory.path} is at iteration {next_t}, not at the end of epoch "
                        f"{epochs_done} of this run's data; --force starts the run over")
    state = checkpoint.load_part(directory.path, epochs_done, run.process, run.config_hash)
    try:
        run.engine.restore_state(state["engine"])
        checkpoint.set_rng_state(state["rng"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        if is_communication_error(exc):  # a peer went away: not this part's fault
            raise
        raise checkpoint.damaged_part(directory.path, epochs_done, run.process, exc) from None
    run.steps_done = next_t
    if run.probe is not None:
        run.probe.restored()
    history = None
    if run.engine.is_primary:
        history = directory.resume(epochs_done, environment(run.devices, run.cfg.seed))
    if run.rank is not None:
        history = from_rank0(history)
    if len(history) != epochs_done:
        raise UserError(f"{directory.path}/metrics.jsonl has {len(history)} epochs, the checkpoint "
                        f"{epochs_done}; --force starts the run over")
    return history
