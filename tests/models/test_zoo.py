"""The model zoo (protege.models.zoo): ResNet depths and size, CNN width and depth."""
import pytest
import torch

from protege.models import count_params
from protege.models.zoo import CNN, MLP, ResNet


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_cifar_resnet_depths(depth):
    m = ResNet((3, 32, 32), 10, depth=depth)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    n_blocks = sum(1 for mod in m.modules() if mod.__class__.__name__ == "BasicBlock")
    assert n_blocks == 3 * (depth - 2) // 6


def test_resnet20_has_the_published_size():
    # He et al. 2016, Table 6: ResNet-20 on CIFAR-10 has 0.27M parameters.
    assert 0.26e6 < count_params(ResNet((3, 32, 32), 10, depth=20)) < 0.28e6


def test_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet((3, 32, 32), 10, depth=21)


def test_cnn_width_and_depth_knobs():
    small, deep = CNN((1, 28, 28), 10, (8, 16), 1), CNN((1, 28, 28), 10, (8, 16), 3)
    assert count_params(deep) > count_params(small)
    assert small(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert MLP((5,), 3, hidden=[4])(torch.randn(2, 5)).shape == (2, 3)
