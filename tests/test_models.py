import pytest
import torch

from fdgbench.errors import UserError
from fdgbench.models import MODELS, build_model, count_parameters

# True parameter counts for 10 classes (shared/paper/REFERENCE.md and the
# models' papers); the FDG README's 0.46M for ResNet-56 is ResNet-32's count.
PUBLISHED = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
    "resnet18": 11_173_962,
    "wrn28_10": 36_479_194,
    "wrn28_10_bias": 36_489_290,
    "wrn16_4": 2_748_890,
}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_parameter_counts_match_published(name, count):
    assert count_parameters(build_model(name)) == count


def test_classes_change_only_the_classifier():
    # 100 classes: the 64->classes linear layer grows by 90 * (64 + 1).
    assert count_parameters(build_model("resnet56", 100)) - count_parameters(build_model("resnet56")) == 90 * 65


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "wrn16_4", "tiny_resnet", "tiny_deep_resnet"])
def test_block_lists_have_stem_residual_stages_and_head(name):
    model = build_model(name)
    assert model.block_names[0] == "stem" and model.block_names[-1] == "head"
    assert all(n.startswith("L") for n in model.block_names[1:-1])
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_option_a_shortcut_has_no_parameters():
    block = build_model("resnet20").block(4)  # L2.0: 16 -> 32 channels, stride 2
    convs = sum(p.numel() for n, p in block.named_parameters() if "conv" in n)
    assert convs == 16 * 32 * 9 + 32 * 32 * 9
    assert block(torch.randn(1, 16, 8, 8)).shape == (1, 32, 4, 4)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet7'"):
        build_model("resnet7")


def test_registry_is_complete():
    # Every published model is registered; the rest are ResNet-44, the reversible counterparts of registered
    # ResNets (models/revnet.py: the same block names, so the same partitions) and test-sized models that say so.
    assert set(PUBLISHED) <= set(MODELS)
    extra = set(MODELS) - set(PUBLISHED) - {"resnet44"}
    reversible = {name for name in extra if name.startswith("revnet")}
    assert reversible and all(build_model(name).block_names == build_model(name.replace("revnet", "resnet")).block_names
                              and "reversible counterpart" in MODELS[name].description for name in reversible)
    tests = extra - reversible
    assert tests and all(name.startswith("tiny_") and "for tests" in MODELS[name].description for name in tests)


def test_each_model_states_its_block_count():
    # ModelInfo.blocks bounds K where building a model would be too slow (schedule show); it must be the truth.
    with torch.device("meta"):
        assert {name: len(build_model(name)) for name in MODELS} == {name: m.blocks for name, m in MODELS.items()}
