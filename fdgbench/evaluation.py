"""Test-set scoring shared by the engines: each stage's eval-mode forward and
the last stage's loss and error, so every engine computes the same numbers
in the same order."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(stages: Sequence[nn.Module]) -> Iterator[None]:
    for s in stages:
        s.eval()
    try:
        yield
    finally:
        for s in stages:
            s.train()


@torch.no_grad()
def eval_forward(stage: nn.Module, x: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None) -> torch.Tensor:
    x = x.to(device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return stage(x)


class EvalScore:
    """Summed test loss and correct count of the logits seen so far, kept on
    the logits' device and read once by ``result`` (an ``.item()`` per batch
    would make the host wait for the device after every batch)."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.correct: torch.Tensor | int = 0
        self.count = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(logits.device)
        # float64 sums: the same numbers as the Python floats they replace.
        self.loss_sum = self.loss_sum + F.cross_entropy(logits.float(), labels, reduction="sum").double()
        # Non-finite logits (e.g. BN running statistics not yet trained in a
        # very deep net) count as wrong; the loss shows them as NaN/inf.
        self.correct = self.correct + ((logits.argmax(1) == labels) & torch.isfinite(logits).all(1)).sum()
        self.count += len(labels)

    def result(self) -> dict[str, float]:
        """Test loss and error (%). Divergence is judged on the training loss
        only: a non-finite test loss is recorded, not raised."""
        loss_sum, correct = float(self.loss_sum), int(self.correct)
        return {"loss": loss_sum / self.count, "error": 100.0 * (1 - correct / self.count)}
