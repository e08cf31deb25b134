"""Split a BlockModel's block list into K contiguous stages.

Strategies: the paper's own split points, ``uniform`` by block count, balanced
by ``params``, ``flops`` or measured ``time`` (forward + backward per block,
as torchgpipe's balance_by_time), or explicit cut points (``--split-at``).
Invalid requests fail up front with a message that says what to use instead.
"""
from __future__ import annotations

import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .models import BlockModel

STRATEGIES = ("auto", "paper", "uniform", "params", "flops", "time", "balanced")
ALIASES = {"balanced": "time"}  # balanced by measured time, as torchgpipe's balance_by_time

# The FDG authors' split points, as the first block of every stage after the
# first (stem = conv+bn+relu, head = pool+fc; L1..L3 the residual stages).
_BY_STAGE = ("L2.0", "L3.0")
PAPER_SPLITS: dict[str, dict[int, tuple[str, ...]]] = {
    "resnet20": {2: ("L2.1",), 3: _BY_STAGE},
    "resnet56": {2: ("L2.4",), 3: _BY_STAGE, 4: ("L1.6", "L2.4", "L3.2")},
    "resnet110": {2: ("L2.9",), 3: _BY_STAGE, 4: ("L1.13", "L2.9", "L3.5"),
                  5: ("L1.10", "L2.3", "L2.14", "L3.7")},
    "resnet1202": {2: ("L2.50",), 3: _BY_STAGE, 4: ("L1.75", "L2.50", "L3.25"),
                   5: ("L1.60", "L2.20", "L2.80", "L3.40")},
    "resnet18": {2: ("L3.0",), 3: ("L2.0", "L3.1")},
    "wrn28_10": {2: ("L2.2",), 3: _BY_STAGE, 4: ("L1.3", "L2.2", "L3.1")},
}
PAPER_SPLITS["wrn28_10_bias"] = PAPER_SPLITS["wrn28_10"]


@dataclass(frozen=True)
class Partition:
    """``starts[k]`` is the index of stage k's first block; ``starts[0] == 0``."""

    starts: tuple[int, ...]
    num_blocks: int
    strategy: str

    @property
    def num_stages(self) -> int:
        return len(self.starts)

    def ranges(self) -> list[range]:
        ends = self.starts[1:] + (self.num_blocks,)
        return [range(a, b) for a, b in zip(self.starts, ends)]

    def describe(self, names: list[str]) -> str:
        return " | ".join(f"{names[r.start]}..{names[r.stop - 1]}" if len(r) > 1 else names[r.start]
                          for r in self.ranges())


def _check_k(model: BlockModel, k: int) -> None:
    if k < 1:
        raise UserError(f"--splits must be at least 1, got {k}")
    if k > len(model):
        raise UserError(f"{model.name} has {len(model)} blocks, so it cannot be split into {k} stages; "
                        f"use --splits {len(model)} or fewer")


def _starts_from_names(model: BlockModel, cuts: list[str]) -> tuple[int, ...]:
    starts = [0]
    for cut in cuts:
        cut = cut.strip()
        if cut.isdigit():
            index = int(cut)
        elif cut in model.block_names:
            index = model.block_names.index(cut)
        else:
            raise UserError(f"--split-at: {model.name} has no block '{cut}'; blocks are "
                            f"{model.block_names[0]}, {model.block_names[1]}, ..., {model.block_names[-1]}")
        if not starts[-1] < index < len(model):
            raise UserError(f"--split-at: cut points must be increasing block names or indices in "
                            f"1..{len(model) - 1}; '{cut}' is out of order or range")
        starts.append(index)
    return tuple(starts)


def balanced_starts(costs: list[float], k: int) -> tuple[int, ...]:
    """Contiguous split of ``costs`` into k non-empty parts minimising the
    largest part's sum (exact dynamic programme, O(k n^2) with numpy)."""
    n = len(costs)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=np.float64))])
    # best[j][i]: minimal max-part sum splitting the first i blocks into j+1 parts.
    best = prefix.copy()
    best[0] = np.inf
    choices = []
    i_idx = np.arange(n + 1)
    for _ in range(1, k):
        # candidate[i, m] = max(best[m], sum(m..i)), valid for 1 <= m < i.
        cand = np.maximum(best[None, :], prefix[:, None] - prefix[None, :])
        cand[i_idx[:, None] <= i_idx[None, :]] = np.inf
        cand[:, 0] = np.inf
        arg = np.argmin(cand, axis=1)
        best = cand[i_idx, arg]
        choices.append(arg)
    starts = [n]
    for arg in reversed(choices):
        starts.append(int(arg[starts[-1]]))
    starts = sorted(set(starts[1:]) | {0})
    return tuple(starts)


def block_costs(model: BlockModel, by: str, sample: torch.Tensor) -> list[float]:
    """Per-block cost: parameter count, forward multiply-accumulates, or measured
    forward+backward seconds (median of a few repeats) on ``sample``'s device."""
    if by == "params":
        return [float(sum(p.numel() for p in model.block(i).parameters())) for i in range(len(model))]
    # Profiling runs the model in train mode: put back the BN running
    # statistics (and anything else) it touches, so partitioning never
    # changes the numbers of the run that follows.
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    training = model.training
    try:
        if by == "flops":
            return _block_macs(model, sample)
        if by == "time":
            return _block_seconds(model, sample)
        raise ValueError(by)
    finally:
        model.load_state_dict(saved)
        model.train(training)
        model.zero_grad(set_to_none=True)


def _block_macs(model: BlockModel, sample: torch.Tensor) -> list[float]:
    macs = [0.0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            kernel = module.weight[0].numel()  # (cin/groups) * kh * kw
            macs[0] += float(output.numel() * kernel)
        elif isinstance(module, nn.Linear):
            macs[0] += float(output.numel() * module.in_features)

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    costs = []
    try:
        with torch.no_grad():
            x = sample
            for i in range(len(model)):
                macs[0] = 0.0
                x = model.block(i)(x)
                costs.append(macs[0] / sample.shape[0])
    finally:
        for h in handles:
            h.remove()
    return costs


def _block_seconds(model: BlockModel, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    def sync() -> None:
        if sample.device.type == "cuda":
            torch.cuda.synchronize(sample.device)

    costs = []
    x = sample
    for i in range(len(model)):
        block = model.block(i)
        x_in = x.detach().requires_grad_(i > 0)
        times = []
        for _ in range(repeats + 1):  # the first run warms up kernels and caches
            sync()
            t0 = time.perf_counter()
            y = block(x_in)
            y.backward(torch.ones_like(y))
            sync()
            times.append(time.perf_counter() - t0)
        block.zero_grad(set_to_none=True)
        costs.append(statistics.median(times[1:]))
        with torch.no_grad():
            x = block(x_in)
    return costs


def make_partition(model: BlockModel, k: int, strategy: str = "auto", split_at: list[str] | None = None,
                   sample: torch.Tensor | None = None) -> Partition:
    """Resolve a partition request. ``auto`` is the paper's split where one is
    known, else balanced by FLOPs. ``sample`` (an input batch) is needed by
    ``flops`` and ``time``."""
    if split_at:
        starts = _starts_from_names(model, split_at)
        if k and len(starts) != k:
            raise UserError(f"--split-at gives {len(starts)} stages but --splits is {k}; "
                            f"give {k - 1} cut points or drop --splits")
        return Partition(starts, len(model), "explicit")
    _check_k(model, k)
    strategy = ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise UserError(f"unknown partition strategy '{strategy}'; known: {', '.join(STRATEGIES)}")
    known = PAPER_SPLITS.get(model.name, {})
    if k == 1:
        return Partition((0,), len(model), "paper" if strategy == "auto" else strategy)
    if strategy == "auto":
        strategy = "paper" if k in known else "flops"
    if strategy == "paper":
        if k not in known:
            have = ", ".join(f"{m} K={','.join(map(str, ks))}" for m, ks in PAPER_SPLITS.items())
            raise UserError(f"no paper split for {model.name} with K={k} (known: {have}); "
                            f"use --partition uniform|params|flops|time or --split-at")
        return Partition(_starts_from_names(model, list(known[k])), len(model), "paper")
    if strategy == "uniform":
        costs = [1.0] * len(model)
    else:
        if sample is None:
            sample = torch.zeros(2, 3, 32, 32)
        costs = block_costs(model, strategy, sample)
    return Partition(balanced_starts(costs, k), len(model), strategy)


def build_stages(model: BlockModel, partition: Partition) -> list[nn.Sequential]:
    """The stage modules, sharing the model's block objects (no copies)."""
    if partition.num_blocks != len(model):
        raise ValueError("partition was made for a different model")
    return [nn.Sequential(OrderedDict((model.block_names[i].replace(".", "_"), model.block(i)) for i in r))
            for r in partition.ranges()]


def balance(costs: list[float], partition: Partition) -> float:
    """Slowest stage's cost over the mean stage cost (1.0 = perfectly balanced)."""
    per_stage = [sum(costs[i] for i in r) for r in partition.ranges()]
    return max(per_stage) / (sum(per_stage) / len(per_stage))


def block_output_shapes(model: BlockModel, sample_shape: tuple[int, ...],
                        device: torch.device | None = None) -> tuple[tuple[int, ...], ...]:
    """One sample's output shape after every block (StageContext.block_shapes),
    from one eval-mode pass of the model on zeros on ``device`` (the model's;
    default CPU)."""
    shapes = []
    with torch.no_grad():
        x = torch.zeros(2, *sample_shape, device=device)
        was_training = model.training
        model.eval()
        for i in range(len(model)):
            x = model.block(i)(x)
            shapes.append(tuple(x.shape[1:]))
        model.train(was_training)
    return tuple(shapes)
