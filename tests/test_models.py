"""Model zoo: shapes, GroupNorm only, perturbation slots, user factories, seeded init."""

import pytest
import torch
from torch import nn

from mechanisms.models import BasicBlock, PerturbationSlot, build_model, residual_blocks


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "resnet20"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_output_shape_and_no_batchnorm(name, shape):
    model = build_model(name, shape, 7, seed=0)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_residual_blocks_have_noop_perturbation_slots():
    assert len(residual_blocks(build_model("resnet8", (1, 28, 28), 10))) == 3
    model = build_model("resnet20", (3, 32, 32), 10, seed=0)
    blocks = residual_blocks(model)
    assert len(blocks) == 9 and all(isinstance(b.perturb, PerturbationSlot) for b in blocks)
    block = blocks[3]  # a downsampling block
    x = torch.randn(2, 16, 8, 8)
    branch = block.norm2(block.conv2(torch.relu(block.norm1(block.conv1(x)))))
    expected = torch.relu(block.shortcut(x) + branch)
    assert torch.equal(block(x), expected)
    assert isinstance(block, BasicBlock)


def test_clear_errors_for_unsuitable_inputs():
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("cnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="image inputs"):
        build_model("resnet8", (20,), 2)
    with pytest.raises(ValueError, match="known models: cnn, mlp, resnet20, resnet8"):
        build_model("vgg", (1, 28, 28), 10)


def test_user_factory():
    model = build_model("tests.user_models:tiny", (4,), 3, seed=0)
    assert model(torch.zeros(2, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_pkg.mod:f", (4,), 3)
    with pytest.raises(ValueError, match="no callable 'missing'"):
        build_model("tests.user_models:missing", (4,), 3)
    with pytest.raises(ValueError, match="not nn.Module"):
        build_model("tests.user_models:not_a_module", (4,), 3)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model("cnn", (1, 28, 28), 10, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_model("cnn", (1, 28, 28), 10, seed=3)
    c = build_model("cnn", (1, 28, 28), 10, seed=4)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert not torch.equal(a[0][0].weight, c[0][0].weight)
