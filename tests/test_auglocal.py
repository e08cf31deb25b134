"""AugLocal (methods/auglocal.py) against the authors' rules and a hand
computation: the pyramidal depths and uniformly sampled layers as their
code gives them, the auxiliary nets' shapes, one iteration's local losses
and updates written out with functional ops, and bad options refused.
K = 1 (AugLocal is BP), the schedule, checkpoint/resume and both engines are
the generic per-method tests (pytest -k auglocal)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdgbench.engines.sequential import SequentialEngine
from fdgbench.method import make_method
from fdgbench.models import build_model
from fdgbench.optim import SGDConfig
from fdgbench.partition import block_output_shapes
from fdgbench.stage import StageContext

from .helpers import ToyStream
from .test_bad_input import _run_refused

LR = 0.5
B, CLASSES = 6, 3


def test_pyramidal_depths_are_the_authors():
    method = make_method("auglocal", aug_depth=3)
    # ResNet-110, --aux_net_depth 3 --pyramid_coeff 0.5, --local_module_num 55: their code trains 55 - 3 = 52
    # modules, 51 with an auxiliary net; its aux_depth_list, printed from their model: 25 of depth 3, then 26 of 2.
    depths = [method.aux_depth(i, 52) for i in range(51)]
    assert depths == [3] * 25 + [2] * 26
    # ResNet-32, --aux_net_depth 2 (README): 14 modules, every depth 2 (the last value 1.5 rounds half to even).
    assert [make_method("auglocal").aux_depth(i, 14) for i in range(13)] == [2] * 13
    # tau = 0: no pyramid; K = 2: the one local stage has depth d.
    assert {make_method("auglocal", aug_depth=4, aug_pyramid=0.0).aux_depth(i, 8) for i in range(7)} == {4}
    assert make_method("auglocal", aug_depth=5).aux_depth(0, 2) == 5


@pytest.mark.parametrize("last,layers,depth,expected", [
    (0, 55, 3, [18, 36, 54]),  # their ResNet-110, module 0 (printed from their model)
    (25, 55, 2, [40, 54]),  # module 25: round(39.5) = 40, half to even on the absolute index
    (0, 16, 2, [8, 15]),  # their ResNet-32, module 0: round(7.5) = 8
    (3, 16, 2, [9, 15]),
    (12, 16, 2, [14, 15]),
    (13, 16, 3, [14, 15]),  # fewer layers left than the depth: all of them
])
def test_sampled_layers_are_the_authors(last, layers, depth, expected):
    from methods.auglocal import sampled_layers
    assert sampled_layers(last, layers, depth) == expected


def _conv_shapes(net):
    return [(m.in_channels, m.out_channels, m.stride[0]) for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_auxiliary_nets_are_shaped_after_the_sampled_layers():
    """ResNet-32 cut after its stem (their module 0, d = 2): layers 8 (32 channels, 16x16) and 15 (64, 8x8)
    become a 16->32 stride-2 block and a 32->64 stride-2 block, each with a 1x1 projection shortcut, then
    pooling and a linear layer (no BatchNorm1d at depth 2). Depth 1 from the stem: one 16->64 block that
    downsamples once (the second halving dropped, as their code does), then BatchNorm1d."""
    model = build_model("resnet32")
    shapes = block_output_shapes(model, (3, 32, 32))

    def aux_of(depth):
        ctx = StageContext(0, 2, model.block(0), torch.device("cpu"), output_shape=shapes[0], blocks=range(0, 1),
                           block_shapes=shapes, num_classes=10)
        return make_method("auglocal", aug_depth=depth).make_worker(ctx).aux

    aux = aux_of(2)
    assert _conv_shapes(aux) == [(16, 32, 2), (32, 32, 1), (16, 32, 2), (32, 64, 2), (64, 64, 1), (32, 64, 2)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in aux.modules())
    assert aux(torch.randn(4, 16, 32, 32)).shape == (4, 10)
    aux = aux_of(1)
    assert _conv_shapes(aux) == [(16, 64, 2), (64, 64, 1), (16, 64, 2)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in aux.modules()) == 1
    # The authors' init: conv weights N(0, 2 / (k * k * out)): about 2 / 9 / 64 for the 3x3 convs to 64.
    assert float(aux[0].body[3].weight.detach().var()) == pytest.approx(2 / (9 * 64), rel=0.1)


# --- one iteration against a hand computation -----------------------------------------------------------------

def _toy():
    """Float64, 8x8 images, K = 3: conv 3->4 stride 2 (to 4x4), conv 4->8 stride 2 (to 2x2), linear head."""
    torch.manual_seed(3)
    return [m.double() for m in (nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.ReLU()),
                                 nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
                                 nn.Sequential(nn.Flatten(), nn.Linear(32, CLASSES)))]


def _bn2d(x, w, b):  # training mode: batch statistics over (N, H, W), biased variance, eps 1e-5
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _bn1d(x, w, b):
    mean = x.mean(0, keepdim=True)
    var = ((x - mean) ** 2).mean(0, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def _ce(logits, labels):
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()


def _stage0_aux(h, p):
    """Stage 0's auxiliary net written out: one basic block 4 -> 8 channels, stride 2 (the sampled layer 1 is
    8 x 2 x 2), projection shortcut, then global pooling, BatchNorm1d (depth 1) and the classifier."""
    c1, g1, b1, c2, g2, b2, cs, gs, bs, g3, b3, w, bias = p
    out = torch.relu(_bn2d(F.conv2d(h, c1, stride=2, padding=1), g1, b1))
    out = _bn2d(F.conv2d(out, c2, padding=1), g2, b2)
    out = torch.relu(out + _bn2d(F.conv2d(h, cs, stride=2), gs, bs))
    return _bn1d(out.mean(dim=(2, 3)), g3, b3) @ w.T + bias


def _stage1_aux(h, p):
    """Stage 1 ends at the last layer: no block to copy, only the head (pooling, BatchNorm1d, classifier)."""
    g, b, w, bias = p
    return _bn1d(h.mean(dim=(2, 3)), g, b) @ w.T + bias


def test_one_iteration_equals_the_hand_computed_local_losses_and_updates():
    method = make_method("auglocal")
    modules = _toy()
    shapes = ((4, 4, 4), (8, 2, 2), (CLASSES,))
    optim = SGDConfig(lr=LR, momentum=0.0, weight_decay=0.0)  # a step is w - LR * dL/dw
    workers = [method.make_worker(StageContext(k, 3, m, torch.device("cpu"), optim, output_shape=shapes[k],
                                               blocks=range(k, k + 1), block_shapes=shapes, num_classes=CLASSES,
                                               seed=0)) for k, m in enumerate(modules)]
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(B, 3, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    nets = [(w.module, w.aux) for w in workers[:2]] + [(workers[2].module,)]
    before = [[p.detach().clone() for p in net.parameters()] for stage in nets for net in stage]
    SequentialEngine(method, workers, ToyStream(lambda t: images, lambda t: labels)).run_iteration(0)

    # Stage 0: its conv and its auxiliary net, on the auxiliary loss alone.
    (w0,), aux0 = ([p.clone().requires_grad_(True) for p in ps] for ps in before[0:2])
    h0 = torch.relu(F.conv2d(images, w0, stride=2, padding=1))
    loss0 = _ce(_stage0_aux(h0, aux0), labels)
    # Stage 1 gets stage 0's output (computed before stage 0 stepped), no gradient back.
    (w1, b1), aux1 = ([p.clone().requires_grad_(True) for p in ps] for ps in before[2:4])
    h1 = torch.relu(F.conv2d(h0.detach(), w1, b1, stride=2, padding=1))
    loss1 = _ce(_stage1_aux(h1, aux1), labels)
    # Stage 2 (the last) trains on the network's loss.
    w2, b2 = (p.clone().requires_grad_(True) for p in before[4])
    loss2 = _ce(h1.detach().flatten(1) @ w2.T + b2, labels)
    for k, (loss, params) in enumerate([(loss0, [w0, *aux0]), (loss1, [w1, b1, *aux1]), (loss2, [w2, b2])]):
        grads = torch.autograd.grad(loss, params)
        stepped = [p for net in nets[k] for p in net.parameters()]
        assert len(stepped) == len(grads), k
        for p, p0, g in zip(stepped, params, grads):
            torch.testing.assert_close(p.detach(), p0.detach() - LR * g, rtol=1e-10, atol=1e-12)
        assert all(g.abs().max() > 0 for g in grads), k  # not vacuous: every parameter moved
    assert workers[0].meters["aux_loss"].take() == pytest.approx(loss0.item(), rel=1e-12)
    assert workers[1].meters["aux_loss"].take() == pytest.approx(loss1.item(), rel=1e-12)


@pytest.mark.parametrize("args,message", [
    (["--aug-depth", "0"], "--aug-depth must be at least 1, got 0"),
    (["--aug-pyramid", "1.5"], "--aug-pyramid must be in [0, 1], got 1.5"),
    (["--aug-pyramid", "nan"], "--aug-pyramid must be in [0, 1], got nan"),
])
def test_bad_options_are_one_line(cli, tmp_path, args, message):
    _run_refused(cli, tmp_path, ["--method", "auglocal", *args], message)
