import pytest
import torch

from metaxfer.backbones import Conv4, create, list_backbones
from metaxfer.errors import ConfigError


def test_registry_and_shapes():
    assert "conv4" in list_backbones()
    net = create("conv4", in_channels=1)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 64)
    head = create("conv4", in_channels=3, num_classes=5, image_size=84)
    assert head(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert create("conv4", downsample="stride", num_classes=5)(torch.zeros(1, 1, 28, 28)).shape == (1, 5)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9'; choose one of: conv4"):
        create("resnet9")


def test_paper_architecture():
    net = Conv4()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] * 4 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 4
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 4


def test_split_batchnorm_equals_affine_batchnorm():
    torch.manual_seed(0)
    a = Conv4(hidden=8, norm="batchnorm").double()
    b = Conv4(hidden=8, norm="batchnorm_split").double()
    with torch.no_grad():
        for block_a, block_b in zip(a.features, b.features):
            block_b[0].load_state_dict(block_a[0].state_dict())
            block_a[1].weight.uniform_(0.5, 1.5)
            block_a[1].bias.uniform_(-0.5, 0.5)
            block_b[2].weight.copy_(block_a[1].weight)
            block_b[2].bias.copy_(block_a[1].bias)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(a(x), b(x), atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"norm": "layer"}, {"downsample": "avg"}])
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        Conv4(**kwargs)
