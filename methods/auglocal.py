"""AugLocal, augmented local learning (Ma, Wu, Chen and Tan, "Scaling
Supervised Local Learning with Augmented Auxiliary Networks", ICLR 2024),
after the authors' code (github.com/ChenxiangMA/AugLocal at 98c90d6:
auxiliary_nets.py, resnet.py, train.py, README.md's commands).

Every stage k < K-1 trains on the cross-entropy of its own auxiliary net
(weight 1), its output detached before the next stage (no gradient crosses
a boundary, as in DGL); the last stage trains on the network's loss. The
auxiliary net is built from the rest of the network:

- **Depth, pyramidal** (resnet.py ``aux_depth_list``): stage k of K gets
  d_k = max(1, round(d * (1 - tau * r) + tau * r)) blocks, r = k / (K - 2)
  (r = 0 for K = 2), Python's round (half to even) as theirs; d =
  ``--aug-depth`` (the first stage's depth; 2, their ResNet-32 command),
  tau = ``--aug-pyramid`` (0.5 in every command; 0 keeps every depth d).
  The depth falls linearly from d towards 1 with the stage's depth.
- **Layers, sampled uniformly** (auxiliary_nets.py): with g the stage's
  last layer and R the layers after it (the network's blocks up to its last
  before the head), the auxiliary net copies the architecture of layers
  round(g + R * j / d_k) for j = 1..d_k (the last is always the network's
  last block); all R of them when d_k >= R.
- **Each sampled layer becomes one fresh basic block** (conv3x3-BN-ReLU-
  conv3x3-BN, plus a 1x1 conv + BN shortcut when the stride or the width
  changes, then ReLU) whose output width is the sampled layer's and whose
  input is the previous auxiliary block's output. It downsamples (stride 2)
  once for every halving of the resolution between the previous sampled
  layer and this one; halvings beyond one per block are carried to the next
  block and dropped after the last (their code counts halvings by width
  doublings, which on the CIFAR ResNets is the same count).
- **Head**: global average pooling, BatchNorm1d only when d_k <= 1, and a
  linear classifier.
- **Weights fresh** (nothing copied from the network), initialised as their
  code initialises every module: convs N(0, 2 / (k*k*out)), BN 1 and 0,
  linears PyTorch's default; trained by the stage's SGD on its lr schedule
  (StageWorker.add_local).

The schedule is DGL's sync one. Departures (docs/faithfulness.md): the
suite's K stages are the local modules (their code turns ``--local_module_num
K`` into K - d modules, the top d + 1 layers trained together); the auxiliary
blocks are post-activation basic blocks whatever the network's own blocks are.
"""
import math

import torch
from torch import nn

from fdgbench.errors import UserError
from fdgbench.method import MethodOption, at_least_one, register
from fdgbench.stage import StageWorker

from .dgl import DGL, LocalLossWorker
from .infopro import authors_init


def _pyramid_check(value: float) -> str | None:
    return None if math.isfinite(value) and 0 <= value <= 1 else f"must be in [0, 1], got {value}"


DEPTH = MethodOption("aug_depth", int, 2, "blocks in the first stage's auxiliary net (the authors' --aux_net_depth; "
                     ">= 1)", check=at_least_one)
PYRAMID = MethodOption("aug_pyramid", float, 0.5, "how fast the auxiliary nets' depth falls towards 1 with the "
                       "stage's depth (the authors' --pyramid_coeff; 0: every net has --aug-depth blocks)",
                       check=_pyramid_check)


def pyramid_depth(depth: int, pyramid: float, k: int, num_stages: int) -> int:
    """Blocks in stage k's auxiliary net (resnet.py aux_depth_list)."""
    ratio = k * pyramid / (num_stages - 2) if num_stages > 2 else 0.0
    return max(1, round(depth * (1 - ratio) + ratio))


def sampled_layers(last: int, num_layers: int, depth: int) -> list[int]:
    """The layers (indices into the network's layers 0..num_layers-1, the head
    excluded) whose architecture a stage ending at layer ``last`` copies."""
    remaining = num_layers - 1 - last
    if depth >= remaining:
        return list(range(last + 1, num_layers))
    return [round(last + remaining * j / depth) for j in range(1, depth + 1)]


class AuxBlock(nn.Module):
    """auxiliary_nets.py's BasicBlock with its 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def aux_net(input_shape: tuple[int, ...], layer_shapes: list[tuple[int, ...]], num_classes: int) -> nn.Sequential:
    """Blocks shaped after ``layer_shapes`` (the sampled layers' output shapes,
    (C, H, W)) on an input of ``input_shape``, then the head."""
    blocks: list[nn.Module] = []
    width, height = input_shape[0], input_shape[1]
    halvings = 0
    for c, h, _ in layer_shapes:
        halvings += int(math.log2(height // h)) if h < height else 0
        stride = 2 if halvings >= 1 else 1
        halvings -= stride == 2
        blocks.append(AuxBlock(width, c, stride))
        width, height = c, h
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if len(layer_shapes) <= 1:
        head.append(nn.BatchNorm1d(width))
    return nn.Sequential(*blocks, *head, nn.Linear(width, num_classes))


@register
class AugLocal(DGL):
    """DGL's sync schedule (inherited: ``variant`` is fixed), AugLocal's auxiliary nets."""

    name = "auglocal"
    order = 56
    summary = ("augmented local learning: every stage trains on an auxiliary net shaped after layers sampled "
               "uniformly from the rest of the network, shallower for deeper stages")
    options = (DEPTH, PYRAMID)
    variant = "sync"

    def aux_depth(self, k: int, num_stages: int) -> int:
        """Blocks in stage k's auxiliary net (the pyramid)."""
        return pyramid_depth(self.aug_depth, self.aug_pyramid, k, num_stages)

    def aux_layers(self, k: int, num_stages: int, last: int, block_shapes: tuple[tuple[int, ...], ...]) -> list[int]:
        """The blocks (indices into the network's block list) whose
        architecture stage k, ending at block ``last``, copies."""
        layers = sum(len(s) == 3 for s in block_shapes)  # the blocks with a (C, H, W) output: all but the head
        return sampled_layers(last, layers, self.aux_depth(k, num_stages))

    def make_worker(self, ctx):
        if ctx.is_last:
            return StageWorker(ctx, input_grad=False)
        if ctx.output_shape is None or len(ctx.output_shape) != 3:
            raise UserError(f"auglocal builds its auxiliary nets from convolutional blocks; stage {ctx.index}'s "
                            f"output has shape {ctx.output_shape}")
        layers = [ctx.block_shapes[i] for i in self.aux_layers(ctx.index, ctx.num_stages, ctx.blocks.stop - 1,
                                                                ctx.block_shapes)]
        with ctx.seeded():
            aux = aux_net(ctx.output_shape, layers, ctx.num_classes)
            authors_init(aux)
        return LocalLossWorker(ctx, aux)
