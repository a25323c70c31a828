"""ResNet-12 / ResNet-18: shapes, parameter counts, torchvision key compatibility, mapped loading errors."""

from __future__ import annotations

import re

import pytest
import torch

from metaxfer.backbones import (
    ResNet12,
    ResNet18,
    create,
    list_backbones,
    load_state_dict_mapped,
)
from metaxfer.backbones.resnet import load_torchvision_resnet
from metaxfer.errors import CheckpointError, ConfigError


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered():
    assert {"resnet12", "resnet18"} <= set(list_backbones())


def test_resnet12_paper_size_and_shapes():
    net = create("resnet12")
    # Tian et al. 2020 / Lee et al. 2019 ResNet-12 with 64-160-320-640 channels: ~12.4M parameters.
    assert n_params(net) == pytest.approx(12.42e6, rel=0.01)
    assert net.out_features == 640
    # The full-width forward is slow on 2 cores: shapes are checked on a narrow copy of the same layout.
    small = ResNet12(in_channels=1, channels=(4, 6, 8, 10))
    assert small(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert ResNet12(in_channels=3, channels=(4, 6, 8, 10), num_classes=5)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    flat = ResNet12(channels=(4, 6, 8, 10), avg_pool=False)
    assert flat(torch.zeros(2, 3, 84, 84)).shape == (2, 10 * 5 * 5)  # MetaOptNet's flattened 5x5 map at 84x84


def test_resnet12_rejects_wrong_widths():
    with pytest.raises(ConfigError, match="4 block widths"):
        ResNet12(channels=(8, 16))


def test_resnet18_torchvision_layout():
    net = create("resnet18", num_classes=1000)
    assert n_params(net) == 11_689_512  # torchvision.models.resnet18()
    keys = list(net.state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer2.0.downsample.0.weight" in keys and "layer4.1.bn2.running_var" in keys and keys[-2:] == ["fc.weight", "fc.bias"]
    assert len(keys) == 122  # torchvision resnet18 state dict: 102 tensors + 20 num_batches_tracked
    features = ResNet18(width=4)
    assert features.fc is None and features.out_features == 32
    assert features(torch.zeros(2, 3, 64, 64)).shape == (2, 32)


def test_torchvision_state_dict_loads_by_mapping():
    # A torchvision/timm checkpoint saved from DistributedDataParallel: "module." prefix + 1000-class fc.
    source = ResNet18(width=4, num_classes=1000).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    features = ResNet18(width=4).eval()  # no head: fc.* is dropped
    result = load_torchvision_resnet(features, state)
    assert result.ignored == ["module.fc.weight", "module.fc.bias"]
    x = torch.randn(2, 3, 64, 64)
    pooled = torch.flatten(source.avgpool(source.layer4(source.layer3(source.layer2(source.layer1(
        source.maxpool(source.relu(source.bn1(source.conv1(x))))))))), 1)
    torch.testing.assert_close(features(x), pooled)
    # With a head of the same size the classifier loads too.
    full = ResNet18(width=4, num_classes=1000).eval()
    load_torchvision_resnet(full, state)
    torch.testing.assert_close(full(x), source(x))


def test_mismatched_keys_listed_on_both_sides():
    net = ResNet18(width=4)
    state = {k.replace("layer1.", "stage1."): v for k, v in ResNet18(width=4).state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_state_dict_mapped(net, state)
    msg = str(info.value)
    assert "module keys with no source tensor: layer1.0.bn1.bias" in msg
    assert "source keys the module does not have: stage1.0.bn1.bias" in msg
    # Renamed keys are reported with their source name, which is what a rule must match.
    with pytest.raises(CheckpointError, match=re.escape("stage1.0.bn1.bias (-> stagex1.0.bn1.bias)")):
        load_state_dict_mapped(net, state, rules=[(r"^stage1\.", "stagex1.")])
    # The right rule fixes it.
    load_state_dict_mapped(net, state, rules=[(r"^stage(\d)\.", r"layer\1.")])


def test_shape_mismatch_and_collisions():
    with pytest.raises(CheckpointError, match=r"shape mismatches: conv1.weight: source \(8, 3, 7, 7\) vs module \(4, 3, 7, 7\)"):
        load_state_dict_mapped(ResNet18(width=4), {**ResNet18(width=4).state_dict(), "conv1.weight": torch.zeros(8, 3, 7, 7)})
    state = ResNet18(width=4).state_dict()
    with pytest.raises(CheckpointError, match="both map to"):
        load_state_dict_mapped(ResNet18(width=4), {**state, "copy.conv1.weight": state["conv1.weight"]},
                               rules=[(r"^copy\.", "")])


def test_failed_load_changes_nothing():
    net = ResNet18(width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = {k: torch.ones_like(v) for k, v in net.state_dict().items() if k != "conv1.weight"}
    with pytest.raises(CheckpointError):
        load_state_dict_mapped(net, state)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_backbones_work_in_protonet():
    from metaxfer.learners.metric import ProtoNet

    learner = ProtoNet(ResNet12(in_channels=1, channels=(4, 6, 8, 10)))
    predict = learner.adapt(torch.randn(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]))
    assert predict(torch.randn(3, 1, 28, 28)).shape == (3, 2)
