"""A model is an ordered list of named blocks; partitions cut it between blocks."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn


class BlockModel(nn.Module):
    """Runs its blocks in order. ``block_names`` are the human names used by
    partitions and ``--split-at`` (``stem``, ``L2.4``, ``head``); the module keys
    are the same names with ``.`` replaced, since PyTorch keys cannot hold dots."""

    def __init__(self, named_blocks: list[tuple[str, nn.Module]], name: str = "model"):
        super().__init__()
        if not named_blocks:
            raise ValueError("a BlockModel needs at least one block")
        self.name = name
        self.block_names = [n for n, _ in named_blocks]
        self.blocks = nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in named_blocks))

    def __len__(self) -> int:
        return len(self.blocks)

    def block(self, i: int) -> nn.Module:
        return self.blocks[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def residual_stages(cin: int, widths: tuple[int, ...], blocks_per_stage: int,
                    make_block: Callable[[int, int, int], nn.Module]) -> tuple[list[tuple[str, nn.Module]], int]:
    """The residual stages L1, L2, ...: ``blocks_per_stage`` blocks each,
    named ``L1.0``, ``L1.1``, ... as the paper's splits do; every stage after
    the first starts with a stride-2 block. ``make_block(cin, cout, stride)``.
    Returns the named blocks and the output width."""
    named = []
    for s, width in enumerate(widths):
        for i in range(blocks_per_stage):
            named.append((f"L{s + 1}.{i}", make_block(cin, width, 2 if (s > 0 and i == 0) else 1)))
            cin = width
    return named, cin


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
