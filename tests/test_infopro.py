"""InfoPro (methods/infopro.py) against a hand computation of its local
losses, the lambdas read from the authors' commands, no gradient across a
boundary, the input images reaching every stage, and bad lambdas refused.
K = 1 (InfoPro is BP), the schedule and checkpoint/resume are the generic
per-method tests (pytest -k infopro tests/test_methods.py tests/test_schedule.py
tests/test_checkpoint.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdgbench.config import RunConfig
from fdgbench.data import synthetic_dataset
from fdgbench.engines.sequential import SequentialEngine
from fdgbench.method import make_method
from fdgbench.optim import SGDConfig
from fdgbench.schedule import Op
from fdgbench.stage import StageContext
from fdgbench.train import build_run

from .helpers import ToyStream
from .test_bad_input import TINY, _one_error

# The authors' normalisation constants (resnet.py _image_restore), typed here from their code.
MEAN = torch.tensor([125.3, 123.0, 113.9], dtype=torch.float64).view(1, 3, 1, 1) / 255
STD = torch.tensor([63.0, 62.1, 66.7], dtype=torch.float64).view(1, 3, 1, 1) / 255
LR = 0.5
B, CLASSES = 6, 3


def _toy(K):
    """Float64 stages on 8x8 images: K-1 conv stages (4 channels; the first
    halves the resolution), then a linear head."""
    torch.manual_seed(3)
    convs = [nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.ReLU())]
    convs += [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()) for _ in range(K - 2)]
    return [m.double() for m in (*convs, nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES)))]


def _stream():
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(4, B, 3, 8, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])  # every class twice: each image has a positive for the contrast loss
    return ToyStream(lambda t: images[t], lambda t: labels), images, labels


def _bce(p, t):
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def _bn(x, w, b):  # training-mode batch norm over (N, H, W), biased variance, eps 1e-5
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _decoded(h, params, size):
    w1, b1, g, beta, w2, b2 = params
    up = F.interpolate(h, size=size, mode="bilinear", align_corners=True)
    return torch.sigmoid(F.conv2d(torch.relu(_bn(F.conv2d(up, w1, b1, padding=1), g, beta)), w2, b2, padding=1))


def _head(h, params):
    w, g, beta, l1w, l1b, l2w, l2b = params  # AuxClassifier '1c2f' for C = 4 < 64: conv to 8 channels, stride 2
    z = torch.relu(_bn(F.conv2d(h, w, stride=2, padding=1), g, beta)).mean(dim=(2, 3))
    return torch.relu(z @ l1w.T + l1b) @ l2w.T + l2b


def _ce(logits, labels):
    return (torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean()


def _supcon(features, labels, T=0.07):
    """Khosla et al.'s supervised contrastive loss, one view: per anchor, the
    mean over its positives p of -log(exp(z_i.z_p/T) / sum_{a != i} exp(z_i.z_a/T))."""
    z = features / features.norm(dim=1, keepdim=True)
    per_anchor = []
    for i in range(len(labels)):
        others = [a for a in range(len(labels)) if a != i]
        denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / T for a in others]), 0)
        positives = [p for p in others if labels[p] == labels[i]]
        per_anchor.append(torch.stack([denominator - z[i] @ z[p] / T for p in positives]).mean())
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize("K,options,lambdas", [
    (2, {}, [(5.0, 1.0)]),  # comand.sh, ResNet-32, K = 2: --ixx_1 5 --ixy_1 1
    (2, {"aux_loss": "contrast", "infopro_table": "resnet110"}, [(5.0, 0.5)]),  # ResNet-110, K = 2: 5, 0.5
    (3, {"infopro_lambda1": 2.0, "infopro_lambda2": 0.5}, [(2.0, 0.5), (2.0, 0.5)]),
])
def test_one_iteration_equals_the_hand_computed_local_losses_and_gradients(K, options, lambdas):
    method = make_method("infopro", **options)
    modules = _toy(K)
    shapes = [(4, 4, 4)] * (K - 1) + [(CLASSES,)]
    optim = SGDConfig(lr=LR, momentum=0.0, weight_decay=0.0)  # a step is w - LR * dL/dw
    workers = [method.make_worker(StageContext(k, K, m, torch.device("cpu"), optim, output_shape=shapes[k],
                                               num_classes=CLASSES, seed=0)) for k, m in enumerate(modules)]
    stream, images, labels = _stream()
    before = [[p.detach().clone() for p in net.parameters()]
              for w in workers[:-1] for net in (w.module, w.decoder, w.aux)]
    SequentialEngine(method, workers, stream).run_iteration(0)

    target = (images[0] * STD + MEAN).clamp(0, 1)  # every stage reconstructs the network's input image
    h = images[0]
    for k in range(K - 1):
        weights, decoder, aux = (
            [p.clone().requires_grad_(True) for p in ps] for ps in before[3 * k:3 * k + 3])
        (w0, *bias) = weights  # stage 0: conv without bias; later stages: conv with bias
        out = torch.relu(F.conv2d(h, w0, *bias, stride=2 if k == 0 else 1, padding=1))
        recon = _bce(_decoded(out, decoder, (8, 8)), target)
        head = _head(out, aux)
        aux_loss = _supcon(head, labels) if options.get("aux_loss") == "contrast" else _ce(head, labels)
        lambda1, lambda2 = lambdas[k]
        grads = torch.autograd.grad(lambda1 * recon + lambda2 * aux_loss, [*weights, *decoder, *aux])
        stepped = [p for net in (workers[k].module, workers[k].decoder, workers[k].aux) for p in net.parameters()]
        assert len(stepped) == len(grads)
        for p, p0, g in zip(stepped, [*weights, *decoder, *aux], grads):
            torch.testing.assert_close(p.detach(), p0.detach() - LR * g, rtol=1e-10, atol=1e-12)
        assert all(g.abs().max() > 0 for g in grads[:len(weights)])  # not vacuous
        meters = workers[k].meters
        assert meters["recon_loss"].take() == pytest.approx(recon.item(), rel=1e-12)
        assert meters["aux_loss"].take() == pytest.approx(aux_loss.item(), rel=1e-12)
        h = out.detach()  # what the next stage receives


def _trainer(K, observer=None, **options):
    cfg = RunConfig(method="infopro", method_options=options, model="tiny_resnet", splits=K, dataset="synthetic",
                    batch_size=32, epochs=3, lr=0.05)
    return build_run(cfg, dataset=synthetic_dataset(10, train=256, test=64), observer=observer)


def test_no_gradient_crosses_a_boundary_and_every_stage_gets_the_input_images():
    events = []
    trainer = _trainer(3, lambda t, s, a: events.append((t, s, a.op, a.batch)))
    handed = []
    worker = trainer.workers[1]
    original = worker.set_input_image
    worker.set_input_image = lambda b, image: (handed.append((b, image)), original(b, image))
    for t in range(4):
        trainer.engine.run_iteration(t)
    assert events and not [e for e in events if e[2] in (Op.SEND_GRAD, Op.RECV_GRAD, Op.BACKWARD) and e[1] < 2]
    # Stage 1 (a middle stage) reconstructs batch t's images as stage 0 received them.
    assert [b for b, _ in handed] == [0, 1, 2, 3]
    assert all(torch.equal(image, trainer.stream.batch(b)[0]) for b, image in handed)
    # Stage 0 trains the same whatever the later stages are.
    runs = []
    for perturb in (False, True):
        trainer = _trainer(2)
        if perturb:
            with torch.no_grad():
                for p in trainer.stages[1].parameters():
                    p.mul_(3.0).add_(0.1)
        for t in range(6):
            trainer.engine.run_iteration(t)
        runs.append(trainer.stages[0].state_dict())
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_the_lambdas_are_the_authors_commands_linear_in_depth():
    def lambdas(K, **options):
        return [tuple(round(v, 12) for v in make_method("infopro", **options).lambdas(k, K)) for k in range(K - 1)]

    # comand.sh, CIFAR-10, ResNet-32: K = 4: --ixx_1 6 --ixy_1 0 --ixx_2 1 --ixy_2 2; K = 8: 5 0 0 2;
    # K = 16: 5 0.05 0.2 0.5. ResNet-110, K = 4: 1 0 0 1. In between, linear in k / (K - 2) (resnet.py).
    assert lambdas(4) == [(6.0, 0.0), (3.5, 1.0), (1.0, 2.0)]
    assert lambdas(8)[0] == (5.0, 0.0) and lambdas(8)[-1] == (0.0, 2.0) and lambdas(8)[3] == (2.5, 1.0)
    assert lambdas(16)[0] == (5.0, 0.05) and lambdas(16)[-1] == (0.2, 0.5)
    assert lambdas(4, infopro_table="resnet110") == [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]
    # Other K: the end points of the tabled K nearest in log2 K (3 -> 4, 6 -> 8, 12 -> 16).
    assert lambdas(3) == [(6.0, 0.0), (1.0, 2.0)]
    assert lambdas(6) == [(5.0, 0.0), (3.75, 0.5), (2.5, 1.0), (1.25, 1.5), (0.0, 2.0)]
    assert lambdas(12)[0] == (5.0, 0.05) and lambdas(12)[-1] == (0.2, 0.5)
    # An override replaces one lambda at every local stage.
    assert lambdas(4, infopro_lambda2=0.25) == [(6.0, 0.25), (3.5, 0.25), (1.0, 0.25)]


def test_contrast_and_bf16_autocast_train():
    cfg = RunConfig(method="infopro", method_options={"aux_loss": "contrast"}, model="tiny_resnet", splits=3,
                    dataset="synthetic", batch_size=32, epochs=3, lr=0.05, amp="bf16")
    trainer = build_run(cfg, dataset=synthetic_dataset(10, train=256, test=64))
    for t in range(3):
        trainer.engine.run_iteration(t)
    for worker in trainer.workers[:-1]:
        assert math.isfinite(worker.meters["recon_loss"].take()) and math.isfinite(worker.meters["aux_loss"].take())


@pytest.mark.parametrize("args,message", [
    (["--infopro-lambda1", "-1"], "--infopro-lambda1 must be a non-negative finite number, got -1.0"),
    (["--infopro-lambda2", "inf"], "--infopro-lambda2 must be a non-negative finite number, got inf"),
    (["--infopro-lambda1", "nan"], "--infopro-lambda1 must be a non-negative finite number, got nan"),
    (["--infopro-lambda1", "0", "--infopro-lambda2", "0"], "--infopro-lambda1 and --infopro-lambda2 are both 0"),
    # ResNet-32's K = 4 table gives stage 0 lambda2 = 0; with lambda1 0 it would have no loss.
    (["-K", "4", "--infopro-lambda1", "0"], "infopro stage 0 of K=4 would have lambda1 = lambda2 = 0"),
    (["--aux-loss", "mse"], "--aux-loss"),
    (["--method", "bp", "--infopro-lambda1", "1"], "--infopro-lambda1 is an option of infopro, not bp"),
])
def test_bad_lambdas_are_one_error_line(cli, tmp_path, args, message):
    method = [] if "--method" in args else ["--method", "infopro"]
    status, _, err = cli("run", *method, *TINY, *args, "--out", tmp_path)
    _one_error(status, err, message)
    assert not any(tmp_path.iterdir())
