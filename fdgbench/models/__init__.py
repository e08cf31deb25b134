"""Model registry: every model is a BlockModel (stem, blocks, head)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from .blocks import BlockModel, count_parameters
from .resnet18 import resnet18
from .resnet_cifar import resnet_cifar
from .wrn import wide_resnet


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[[int], BlockModel]
    description: str


def _cifar_resnet(depth: int) -> ModelInfo:
    return ModelInfo(f"resnet{depth}", lambda c: resnet_cifar(depth, c),
                     f"CIFAR ResNet-{depth} (He et al., option-A shortcuts)")


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        *(_cifar_resnet(d) for d in (20, 32, 44, 56, 110, 1202)),
        ModelInfo("resnet18", resnet18, "ResNet-18, CIFAR 3x3 stem, no max-pool"),
        ModelInfo("wrn28_10", lambda c: wide_resnet(28, 10, c), "WRN-28-10, pre-activation"),
        ModelInfo("wrn28_10_bias", lambda c: wide_resnet(28, 10, c, conv_bias=True, name="wrn28_10_bias"),
                  "WRN-28-10 with conv biases, as in the FDG authors' code"),
        ModelInfo("wrn16_4", lambda c: wide_resnet(16, 4, c), "WRN-16-4, pre-activation"),
        ModelInfo("tiny_resnet", lambda c: resnet_cifar(8, c, widths=(8, 16, 32), name="tiny_resnet"),
                  "ResNet-8 at widths 8/16/32 (5 blocks), for tests and smoke runs"),
    ]
}


def build_model(name: str, num_classes: int = 10) -> BlockModel:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
    return MODELS[name].build(num_classes)


__all__ = ["MODELS", "BlockModel", "build_model", "count_parameters"]
