"""Model registry: every model is a BlockModel (stem, blocks, head)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError
from .blocks import BlockModel, count_parameters
from .resnet18 import resnet18
from .resnet_cifar import resnet_cifar
from .revnet import is_reversible, revnet18, revnet_cifar
from .wrn import wide_resnet


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[[int], BlockModel]
    description: str
    blocks: int  # len(build(...)): the most stages it splits into (tests/test_models.py checks it)


def _cifar_resnet(depth: int) -> ModelInfo:
    # Stem, (depth - 2) / 6 residual blocks per stage of three, head.
    return ModelInfo(f"resnet{depth}", lambda c: resnet_cifar(depth, c),
                     f"CIFAR ResNet-{depth} (He et al., option-A shortcuts)", (depth - 2) // 2 + 2)


def _cifar_revnet(depth: int) -> ModelInfo:
    # ResNet-{depth}'s block list, its shape-keeping blocks reversible (models/revnet.py).
    return ModelInfo(f"revnet{depth}", lambda c: revnet_cifar(depth, c),
                     f"reversible counterpart of resnet{depth} (RevNet couplings; downsampling blocks not "
                     f"reversible)", (depth - 2) // 2 + 2)


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        *(_cifar_resnet(d) for d in (20, 32, 44, 56, 110, 1202)),
        ModelInfo("resnet18", resnet18, "ResNet-18, CIFAR 3x3 stem, no max-pool", 10),
        *(_cifar_revnet(d) for d in (20, 56, 110)),
        ModelInfo("revnet18", revnet18, "reversible counterpart of resnet18 (PETRA's RevNet-18)", 10),
        ModelInfo("wrn28_10", lambda c: wide_resnet(28, 10, c), "WRN-28-10, pre-activation", 14),
        ModelInfo("wrn28_10_bias", lambda c: wide_resnet(28, 10, c, conv_bias=True, name="wrn28_10_bias"),
                  "WRN-28-10 with conv biases, as in the FDG authors' code", 14),
        ModelInfo("wrn16_4", lambda c: wide_resnet(16, 4, c), "WRN-16-4, pre-activation", 8),
        ModelInfo("tiny_resnet", lambda c: resnet_cifar(8, c, widths=(8, 16, 32), name="tiny_resnet"),
                  "ResNet-8 at widths 8/16/32 (5 blocks), for tests and smoke runs", 5),
        ModelInfo("tiny_deep_resnet", lambda c: resnet_cifar(32, c, widths=(4, 8, 16), name="tiny_deep_resnet"),
                  "ResNet-32 at widths 4/8/16 (17 blocks), for tests at K = 8 and 16", 17),
        ModelInfo("tiny_revnet", lambda c: revnet_cifar(14, c, widths=(8, 16, 32), name="tiny_revnet"),
                  "RevNet-14 at widths 8/16/32 (8 blocks, 4 reversible), for tests of reversible methods", 8),
        ModelInfo("tiny_deep_revnet", lambda c: revnet_cifar(32, c, widths=(4, 8, 16), name="tiny_deep_revnet"),
                  "tiny_deep_resnet with its shape-keeping blocks reversible (17 blocks), for tests at K = 8 "
                  "and 16", 17),
    ]
}


def reversible_blocks(name: str) -> list[bool]:
    """Which of the model's blocks are reversible (models/revnet.py), from a weightless (meta) model."""
    with torch.device("meta"):
        return [is_reversible(b) for b in build_model(name).blocks]


def reversible_models() -> list[str]:
    """The models with reversible blocks."""
    return [name for name in MODELS if any(reversible_blocks(name))]


def most_blocks() -> int:
    """The largest K any model splits into (one block per stage)."""
    return max(info.blocks for info in MODELS.values())


def build_model(name: str, num_classes: int = 10) -> BlockModel:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    return MODELS[name].build(num_classes)


__all__ = ["MODELS", "BlockModel", "build_model", "count_parameters", "is_reversible", "most_blocks",
           "reversible_blocks", "reversible_models"]
