"""A model is an ordered list of named blocks; partitions cut it between blocks."""
from __future__ import annotations

from collections import OrderedDict

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


def stage_blocks(prefix: str, blocks: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """Names a residual stage's blocks ``L1.0``, ``L1.1``, ... as the paper's splits do."""
    return [(f"{prefix}.{i}", b) for i, b in enumerate(blocks)]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
