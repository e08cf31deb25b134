"""Optional experiment tracking (``--wandb``): the run's config and every
epoch's metrics go to Weights & Biases as well. The run directory stays the
source of truth; wandb honours WANDB_MODE (``offline`` writes its files under
the run directory's ``wandb/``, ``disabled`` does nothing)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UserError


class WandbTracker:
    def __init__(self, project: str):
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb needs the wandb package: pip install 'fdgbench[wandb]'") from None
        self.wandb = wandb
        self.project = project
        self.run = None

    def start(self, name: str, directory: Path, config: dict[str, Any], resumed_from: int | None = None) -> None:
        """A resumed run is a new wandb run named for where it picked up (its
        epochs continue the numbering); the run directory has the whole history."""
        if resumed_from:
            name, config = f"{name}-resumed-e{resumed_from}", {**config, "resumed_after_epoch": resumed_from}
        self.run = self.wandb.init(project=self.project, name=name, dir=str(directory), config=config,
                                   reinit="finish_previous")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["epoch"])

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish(exit_code=0 if summary["status"] == "finished" else 1)
