"""Small builders shared by the method and engine tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fdgbench.engines.sequential import SequentialEngine
from fdgbench.optim import SGDConfig
from fdgbench.stage import StageContext


class Scale(nn.Module):
    """y = w * x with one scalar weight: gradients easy to compute by hand."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x):
        return x * self.w


class ToyStream:
    """Batch t: inputs and targets given as functions of t."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets

    def batch(self, t):
        return self.inputs(t), self.targets(t)

    def labels(self, t):
        return self.targets(t)


def half_sse(out, target):
    return 0.5 * ((out - target) ** 2).sum()


def engine_for(method, modules, stream, optim=SGDConfig(), loss_fn=F.cross_entropy, observer=None):
    k = len(modules)
    workers = [method.make_worker(StageContext(i, k, m, torch.device("cpu"), optim, loss_fn))
               for i, m in enumerate(modules)]
    return SequentialEngine(method, workers, stream, observer), workers


def model_for(method: str, model: str = "tiny_resnet") -> str:
    """``model``, or its reversible counterpart (``tiny_resnet``:
    ``tiny_revnet``) where the method refuses ``model`` (PETRA trains
    reversible networks only)."""
    from fdgbench.method import make_method
    from fdgbench.models import build_model

    with torch.device("meta"):
        refused = make_method(method).check_model(build_model(model))
    return model.replace("resnet", "revnet") if refused else model


def method_configs(k: int, **fields):
    """A RunConfig for every registered method, once per value of its
    staleness mode or (DGL, DNI) forward variant: every stage-state shape
    the engines and checkpoints must handle."""
    from fdgbench.method import all_methods
    from fdgbench.config import RunConfig

    out = []
    for m in all_methods():
        options = {o.name: o.choices for o in m.options if o.name in ("staleness", "variant")}
        name, values = next(iter(options.items()), (None, (None,)))
        for value in values:
            model = {"model": model_for(m.name, fields["model"])} if "model" in fields else {}
            out.append(RunConfig(method=m.name, method_options={name: value} if name else {}, splits=k,
                                 **{**fields, **model}))
    return out
