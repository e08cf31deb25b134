import copy
import itertools
import random

import pytest
import torch

from fdgbench.errors import UserError
from fdgbench.models import MODELS, build_model
from fdgbench.partition import (PAPER_SPLITS, balance, balanced_starts, block_costs, build_stages,
                                make_partition)

SAMPLE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _calibrated(model):
    """Set BN running statistics from a batch: eval-mode outputs of an
    untrained ResNet-1202 overflow to NaN otherwise, which would make the
    comparison vacuous."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(SAMPLE)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: _calibrated(build_model(name)) for name in MODELS}


def _cases():
    for name in MODELS:
        ks = sorted({1, 2, 3, 4, *PAPER_SPLITS.get(name, {})})
        for k in ks:
            strategies = ["uniform", "params", "flops", "time"]
            if k in PAPER_SPLITS.get(name, {}):
                strategies.append("paper")
            for s in strategies:
                yield name, k, s


@pytest.mark.parametrize("name,k,strategy", list(_cases()))
def test_composed_stages_equal_unsplit_model_bit_for_bit(models, name, k, strategy):
    model = models[name]
    part = make_partition(model, k, strategy, sample=SAMPLE)
    # Built from a copy, as a run builds them (it keeps the stages, not the model): the comparison below
    # runs two separate sets of blocks, so it would see a block dropped, repeated or reordered.
    stages = build_stages(copy.deepcopy(model), part)
    assert len(stages) == k and all(len(s) > 0 for s in stages)
    blocks = [b for s in stages for b in s]
    assert len(blocks) == len(model) and not any(a is b for a, b in zip(blocks, model.blocks))
    for train in (False, True):
        model.train(train)
        for s in stages:
            s.train(train)
        with torch.no_grad():
            expected = model(SAMPLE)
            x = SAMPLE
            for s in stages:
                x = s(x)
        assert torch.isfinite(expected).all()
        assert torch.equal(x, expected), (name, k, strategy, train)
    model.eval()


@pytest.mark.parametrize("name,k,expected", [
    ("resnet20", 2, "stem..L2.0 | L2.1..head"),
    ("resnet20", 3, "stem..L1.2 | L2.0..L2.2 | L3.0..head"),
    ("resnet56", 2, "stem..L2.3 | L2.4..head"),
    ("resnet56", 4, "stem..L1.5 | L1.6..L2.3 | L2.4..L3.1 | L3.2..head"),
    ("resnet110", 5, "stem..L1.9 | L1.10..L2.2 | L2.3..L2.13 | L2.14..L3.6 | L3.7..head"),
    ("resnet1202", 4, "stem..L1.74 | L1.75..L2.49 | L2.50..L3.24 | L3.25..head"),
    ("resnet18", 2, "stem..L2.1 | L3.0..head"),
    ("resnet18", 3, "stem..L1.1 | L2.0..L3.0 | L3.1..head"),
    ("wrn28_10", 2, "stem..L2.1 | L2.2..head"),
    ("wrn28_10", 4, "stem..L1.2 | L1.3..L2.1 | L2.2..L3.0 | L3.1..head"),
])
def test_paper_splits_are_the_authors(models, name, k, expected):
    model = models[name]
    assert make_partition(model, k, "paper").describe(model.block_names) == expected


def test_auto_uses_paper_split_and_falls_back_to_flops(models):
    assert make_partition(models["resnet56"], 2, "auto").strategy == "paper"
    assert make_partition(models["resnet32"], 2, "auto", sample=SAMPLE).strategy == "flops"


def test_balanced_starts_is_optimal():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        costs = [rng.choice([0.5, 1, 2, 3, 7]) for _ in range(n)]
        k = rng.randint(1, n)
        starts = balanced_starts(costs, k)
        assert len(starts) == k and starts[0] == 0 and list(starts) == sorted(set(starts))

        def worst(st):
            bounds = list(st) + [n]
            return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

        brute = min(worst((0, *cuts)) for cuts in itertools.combinations(range(1, n), k - 1))
        assert worst(starts) == pytest.approx(brute)


def test_flops_balance_of_resnet56_by_stage_is_within_10_percent(models):
    model = models["resnet56"]
    costs = block_costs(model, "flops", torch.zeros(1, 3, 32, 32))
    part = make_partition(model, 3, "flops", sample=torch.zeros(1, 3, 32, 32))
    assert balance(costs, part) <= 1.10
    # The three residual stages have equal FLOPs, so the balanced split is the paper's.
    assert part.starts == make_partition(model, 3, "paper").starts


def test_explicit_split_at_names_and_indices(models):
    model = models["resnet56"]
    part = make_partition(model, 3, split_at=["L2.4", "20"])
    assert part.starts == (0, 14, 20) and part.strategy == "explicit"


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), "at least 1"),
    (dict(k=12), "has 11 blocks.*--splits 11 or fewer"),
    (dict(k=4, strategy="paper"), "no paper split for resnet20 with K=4"),
    (dict(k=2, strategy="random"), "unknown partition strategy"),
    (dict(k=2, split_at=["L7.0"]), "has no block 'L7.0'"),
    (dict(k=3, split_at=["L3.0", "L2.0"]), "increasing"),
    (dict(k=3, split_at=["L2.0"]), "gives 2 stages but --splits is 3"),
])
def test_invalid_requests_say_what_to_do(models, kwargs, message):
    with pytest.raises(UserError, match=message):
        make_partition(models["resnet20"], **kwargs)


@pytest.mark.parametrize("strategy", ["flops", "time"])
def test_profiling_leaves_the_model_untouched(strategy):
    model = build_model("tiny_resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make_partition(model, 2, strategy, sample=torch.randn(4, 3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(p.grad is None for p in model.parameters())
