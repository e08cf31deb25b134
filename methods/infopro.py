"""InfoPro, information propagation (Wang, Ni, Song, Yang and Huang,
"Revisiting Locally Supervised Learning: an Alternative to End-to-end
Training", ICLR 2021), after the authors' code
(github.com/blackfeather-wang/InfoPro-Pytorch, "Experiments on
CIFAR-SVHN-STL10": networks/resnet.py, networks/auxiliary_nets.py,
networks/losses.py, comand.sh).

Every stage k < K-1 (the authors' local module k of K) minimises

    lambda1_k * BCE(decoder(h_k), x) + lambda2_k * L_aux(aux(h_k), y)

on its output h_k, which is then detached before the next stage (no gradient
crosses a boundary, as in DGL); the last stage trains on the network's loss.

- The decoder (auxiliary_nets.py ``Decoder``) upsamples h_k bilinearly
  (align_corners=True) to the image's size, then Conv3x3(C, 12) + BN + ReLU +
  Conv3x3(12, 3) + Sigmoid, and scores it by nn.BCELoss (mean) against the
  input image x restored to [0, 1] (resnet.py ``_image_restore``: x * std +
  mean with the authors' CIFAR constants, clamped into [0, 1] here because
  the suite normalises with the data's own statistics, docs/faithfulness.md).
- The auxiliary net is the authors' ``AuxClassifier`` with its default
  '1c2f' head (every command of comand.sh uses it): Conv3x3 (C -> 2C, stride
  2 for C < 64; C -> C, stride 1 for C >= 64, as the authors' C = 16/32/64
  cases) + BN + ReLU, global average pool, Linear(., 128) + ReLU + Linear.
  ``--aux-loss ce`` (default): its last layer gives class logits and L_aux
  is the cross-entropy (their 'cross_entropy' mode); ``--aux-loss contrast``:
  it gives 128 features, L2-normalised, and L_aux is the supervised
  contrastive loss at temperature 0.07 (their 'contrast' mode, losses.py
  SupConLoss with one view per image), which every command of comand.sh uses.
- Both nets are initialised as the authors' network initialises every module
  (resnet.py lines 141-147: conv weights N(0, 2 / (k*k*out)), BN 1 and 0;
  conv biases and linears PyTorch's default), and trained by the stage's SGD
  on its lr schedule (StageWorker.add_local).
- lambda1_k and lambda2_k: the authors give (resnet.py forward, train.py
  --ixx_1/--ixy_1/--ixx_2/--ixy_2) the two lambdas of the first and of the
  last local module (k = 0 and k = K-2), linear in between:
  lambda_k = lambda_first * (1 - r) + lambda_last * r with r = k / (K-2)
  (r = 0 for K = 2). The end points are comand.sh's for CIFAR-10, per K in
  {2, 4, 8, 16}, for ResNet-32 and ResNet-110 (``--infopro-table``, default
  resnet32). For any other K the end points are those of the tabled K
  nearest in log2 K (3, 5 -> 4; 6, 7, 9, 10, 11 -> 8; 12 and more -> 16)
  with the same linear rule: the end points are not monotone in K (ResNet-32,
  first module's lambda1: 5, 6, 5, 5 for K = 2, 4, 8, 16), so interpolating
  between two K would invent values no command used. Within every tabled K
  lambda1 falls and lambda2 rises from the first local module to the last
  (the deeper, the less of the input is kept and the more of the label).
  ``--infopro-lambda1`` / ``--infopro-lambda2`` replace that lambda at every
  local stage by one value (non-negative, finite); a stage whose two lambdas
  would both be 0 has no loss and is refused.

The schedule is DGL's sync one (batch t through every stage in iteration t;
each stage steps on its local loss at once); the suite's partition, not the
authors' configs.py split points, places the K-1 boundaries.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from fdgbench.errors import UserError
from fdgbench.method import MethodOption, register
from fdgbench.optim import StageOptimizer
from fdgbench.stage import MeanMeter, StageWorker, upcast_half

from .dgl import DGL, LocalLossWorker

# comand.sh, CIFAR-10 (--local_loss_mode contrast --aux_net_config 1c2f): per K,
# (ixx_1, ixy_1, ixx_2, ixy_2) = (lambda1, lambda2) of the first local module, then of the last (K-2).
LAMBDA_TABLES = {
    "resnet32": {2: (5.0, 1.0, 0.0, 0.0), 4: (6.0, 0.0, 1.0, 2.0), 8: (5.0, 0.0, 0.0, 2.0),
                 16: (5.0, 0.05, 0.2, 0.5)},
    "resnet110": {2: (5.0, 0.5, 0.0, 0.0), 4: (1.0, 0.0, 0.0, 1.0), 8: (5.0, 0.0, 0.0, 1.0),
                  16: (5.0, 0.0, 0.5, 1.0)},
}
# resnet.py _image_restore for CIFAR: the authors' normalisation constants.
IMAGE_MEAN = tuple(v / 255.0 for v in (125.3, 123.0, 113.9))
IMAGE_STD = tuple(v / 255.0 for v in (63.0, 62.1, 66.7))
FEATURE_DIM = 128  # AuxClassifier's hidden width (aux_net_feature_dim in every command)
TEMPERATURE = 0.07  # SupConLoss's temperature and base_temperature


def non_negative(value: float | None) -> str | None:
    if value is None or (math.isfinite(value) and value >= 0):
        return None
    return f"must be a non-negative finite number, got {value}"


AUX_LOSS = MethodOption("aux_loss", str, "ce", "what the auxiliary net's lambda2 term is: ce (cross-entropy "
                        "on class logits) or contrast (supervised contrastive loss, the authors' runs)",
                        choices=("ce", "contrast"))
TABLE = MethodOption("infopro_table", str, "resnet32", "whose lambdas (the authors' CIFAR-10 commands): "
                     "resnet32 or resnet110", choices=tuple(LAMBDA_TABLES), affects_time=False)
LAMBDA1 = MethodOption("infopro_lambda1", float, None, "reconstruction weight at every local stage, replacing "
                       "the authors' per-depth values (>= 0)", check=non_negative, affects_time=False)
LAMBDA2 = MethodOption("infopro_lambda2", float, None, "auxiliary-loss weight at every local stage, replacing "
                       "the authors' per-depth values (>= 0)", check=non_negative, affects_time=False)


def table_lambdas(table: str, k: int, num_stages: int) -> tuple[float, float]:
    """(lambda1, lambda2) of local stage k of K by the authors' linear rule,
    end points from the tabled K nearest in log2 K."""
    tabled = min(LAMBDA_TABLES[table], key=lambda n: abs(math.log2(n) - math.log2(num_stages)))
    ixx_1, ixy_1, ixx_2, ixy_2 = LAMBDA_TABLES[table][tabled]
    ratio = k / (num_stages - 2) if num_stages > 2 else 0.0
    return ixx_1 * (1 - ratio) + ixx_2 * ratio, ixy_1 * (1 - ratio) + ixy_2 * ratio


class Decoder(nn.Module):
    """auxiliary_nets.py Decoder (widen 1): h -> bilinear to the image size -> 3 sigmoid channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                 nn.Conv2d(12, 3, 3, padding=1), nn.Sigmoid())

    def forward(self, h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.net(F.interpolate(h, size=size, mode="bilinear", align_corners=True))


def aux_classifier(channels: int, outputs: int) -> nn.Sequential:
    """auxiliary_nets.py AuxClassifier, net_config '1c2f' (widen 1)."""
    width, stride = (2 * channels, 2) if channels < 64 else (channels, 1)
    return nn.Sequential(nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, FEATURE_DIM), nn.ReLU(),
                         nn.Linear(FEATURE_DIM, outputs))


def authors_init(module: nn.Module) -> None:
    """resnet.py lines 141-147, applied there to every module, auxiliary nets included."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def restore_image(image: torch.Tensor) -> torch.Tensor:
    """resnet.py _image_restore (CIFAR constants), clamped into [0, 1]."""
    mean = torch.tensor(IMAGE_MEAN, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return (image * std + mean).clamp_(0.0, 1.0)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """losses.py SupConLoss (contrast_mode 'all', one view per image) on
    AuxClassifier's L2-normalised features, temperature = base temperature = 0.07."""
    f = F.normalize(features, dim=1)
    n = f.shape[0]
    logits = f @ f.T / TEMPERATURE
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(n, dtype=f.dtype, device=f.device)
    positives = (labels.view(-1, 1) == labels.view(1, -1)).to(f.dtype) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    count = positives.sum(1)
    count = torch.where(count == 0, torch.ones_like(count), count)
    # The authors' factor temperature / base_temperature is 0.07 / 0.07 = 1.
    return -((positives * log_prob).sum(1) / count).mean()


class InfoProWorker(LocalLossWorker):
    """DGL's local-loss stage with InfoPro's auxiliary net and its decoder; its loss is InfoPro's."""

    needs_input_image = True

    def __init__(self, ctx, lambda1: float, lambda2: float, aux_loss: str):
        if ctx.output_shape is None or len(ctx.output_shape) != 3:
            raise ValueError(f"InfoPro's decoder needs a (C, H, W) boundary, got {ctx.output_shape}")
        c = ctx.output_shape[0]
        with ctx.seeded():
            decoder = Decoder(c)
            aux = aux_classifier(c, ctx.num_classes if aux_loss == "ce" else FEATURE_DIM)
            authors_init(decoder)
            authors_init(aux)
        super().__init__(ctx, aux)
        self.lambda1, self.lambda2, self.aux_loss = lambda1, lambda2, aux_loss
        self.decoder = decoder.to(ctx.device, ctx.dtype, memory_format=ctx.memory_format)
        self.add_local("decoder", self.decoder, StageOptimizer(list(self.decoder.parameters()), ctx.optim))
        self.meters = {"recon_loss": MeanMeter(), "aux_loss": MeanMeter()}
        if aux_loss == "ce":
            self.meters["aux_error"] = MeanMeter()

    def _target(self, batch, x: torch.Tensor) -> torch.Tensor:
        image = self.input_image(batch)
        if image is None:
            # Never handed an image: only memory.estimate runs a stage so (on random inputs); stage 0's input
            # is the image, a later stage gets a blank CIFAR-sized one (the estimate charges 32x32).
            image = x if self.ctx.is_first else x.new_zeros(x.shape[0], 3, 32, 32)
        if image.shape[1] != 3:
            raise UserError(f"InfoPro's decoder reconstructs RGB images; these have {image.shape[1]} channel(s)")
        return restore_image(image.detach())

    def forward(self, batch, x, labels):
        out = self.store.forward(batch, x)
        target = self._target(batch, x)
        with self.ctx.autocast():
            recon = self.decoder(out, tuple(target.shape[-2:]))
            head = self.aux(out)
        recon, head = upcast_half(recon), upcast_half(head)
        # BCE outside autocast (it refuses to run under CUDA autocast), in the decoder's precision or fp32.
        recon_loss = F.binary_cross_entropy(recon, target.to(recon.dtype))
        if self.aux_loss == "ce":
            aux_loss = F.cross_entropy(head, labels)
            self.meters["aux_error"].add(100.0 * (head.argmax(1) != labels).float().mean())
        else:
            aux_loss = supcon_loss(head, labels)
        self.store.set_root(batch, self.lambda1 * recon_loss + self.lambda2 * aux_loss)
        self.meters["recon_loss"].add(recon_loss)
        self.meters["aux_loss"].add(aux_loss)
        return out.detach()


@register
class InfoPro(DGL):
    """DGL's sync schedule (inherited: ``variant`` is fixed), InfoPro's local losses."""

    name = "infopro"
    order = 55
    summary = ("information propagation: every stage trains on reconstructing the input image plus an "
               "auxiliary classifier (or contrastive) loss")
    options = (AUX_LOSS, TABLE, LAMBDA1, LAMBDA2)
    variant = "sync"

    def __init__(self, **values):
        super().__init__(**values)
        if self.infopro_lambda1 == 0 and self.infopro_lambda2 == 0:
            raise UserError("--infopro-lambda1 and --infopro-lambda2 are both 0: the local stages would have no loss")

    def lambdas(self, k: int, num_stages: int) -> tuple[float, float]:
        """(lambda1, lambda2) of local stage k of K: the table's, or the overrides."""
        lambda1, lambda2 = table_lambdas(self.infopro_table, k, num_stages)
        return (lambda1 if self.infopro_lambda1 is None else self.infopro_lambda1,
                lambda2 if self.infopro_lambda2 is None else self.infopro_lambda2)

    def make_worker(self, ctx):
        if ctx.is_last:
            return StageWorker(ctx, input_grad=False)
        lambda1, lambda2 = self.lambdas(ctx.index, ctx.num_stages)
        if lambda1 == 0 and lambda2 == 0:
            raise UserError(f"infopro stage {ctx.index} of K={ctx.num_stages} would have lambda1 = lambda2 = 0 (no "
                            f"loss); give --infopro-lambda1 or --infopro-lambda2 a positive value")
        return InfoProWorker(ctx, lambda1, lambda2, self.aux_loss)
