"""Residual networks: ResNet-12 (the few-shot standard) and ResNet-18 (torchvision layout).

* :class:`ResNet12` follows MetaOptNet (Lee et al., CVPR 2019) and RFS
  (Tian et al., ECCV 2020): four residual blocks of three 3x3 convolutions
  with 64-160-320-640 channels, BatchNorm, LeakyReLU(0.1) and a 2x2 max-pool
  per block; about 12.4M parameters. DropBlock is not implemented.
* :class:`ResNet18` is He et al., CVPR 2016, with exactly torchvision's module
  tree and parameter names, so a torchvision or timm ``resnet18`` state dict
  loads as is (:func:`load_torchvision_resnet`).

Both map ``[N, C, H, W]`` images to ``[N, out_features]`` features after global
average pooling, or to ``[N, num_classes]`` logits when ``num_classes`` is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from metaxfer.backbones.convert import MappedLoad, load_state_dict_mapped
from metaxfer.backbones.registry import register_backbone
from metaxfer.errors import ConfigError


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_weights(module: nn.Module, nonlinearity: str) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- ResNet-12


class ResNet12Block(nn.Module):
    """Three 3x3 conv-BN layers with a 1x1 conv-BN shortcut, LeakyReLU(0.1), then a 2x2 max-pool.

    Shapes:
        ``[N, in_channels, H, W] -> [N, out_channels, H // 2, W // 2]``.
    """

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv3 = _conv3x3(out_channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.LeakyReLU(negative_slope)
        # The channel count changes in every block, so the shortcut always needs a projection.
        self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.relu(out + self.downsample(x)))


class ResNet12(nn.Module):
    """ResNet-12 of MetaOptNet (Lee et al. 2019) and RFS (Tian et al. 2020).

    Args:
        in_channels: image channels (3 for miniImageNet, 1 for Omniglot).
        channels: output channels of the four blocks (64, 160, 320, 640 in the
            papers; (64, 128, 256, 512) is the narrower TADAM variant).
        num_classes: when given, a linear head maps the pooled features to
            ``num_classes`` logits; when ``None`` the output is the features.
        avg_pool: global average pooling of the last feature map (RFS); when
            ``False`` the map is flattened (MetaOptNet's ``640 * 5 * 5`` at 84x84)
            and ``out_features`` is only known after a forward pass at the input size.
        negative_slope: LeakyReLU slope (0.1 in both papers).

    Shapes:
        input ``[N, in_channels, H, W]`` (H, W >= 16) -> ``[N, channels[-1]]`` features
        (``[N, 640]``), or ``[N, num_classes]`` logits.

    Example:
        >>> ResNet12(in_channels=3)(torch.zeros(2, 3, 84, 84)).shape
        torch.Size([2, 640])
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        num_classes: int | None = None,
        avg_pool: bool = True,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4:
            raise ConfigError(f"ResNet12 needs 4 block widths, got channels={channels}")
        widths = [in_channels, *channels]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            ResNet12Block(widths[i], widths[i + 1], negative_slope) for i in range(4)
        )
        self.avg_pool = avg_pool
        self.out_features = channels[-1]
        if num_classes is not None and not avg_pool:
            raise ConfigError("ResNet12 with num_classes needs avg_pool=True (the flattened size depends on the input size)")
        self.fc = nn.Linear(self.out_features, num_classes) if num_classes is not None else None
        _init_weights(self, "leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        z = x.mean(dim=(2, 3)) if self.avg_pool else x.flatten(1)
        return self.fc(z) if self.fc is not None else z


# ---------------------------------------------------------------- ResNet-18 (torchvision layout)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 conv-BN layers and a shortcut (projected when the shape changes)."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 (He et al., CVPR 2016) with torchvision's module names.

    ``conv1, bn1, layer1..layer4 (2 blocks each), fc``: the keys of
    ``torchvision.models.resnet18().state_dict()`` and of timm's ``resnet18``,
    so their ImageNet weights load with :func:`load_torchvision_resnet`
    (``fc`` only when ``num_classes`` is given; 11.69M parameters with a
    1000-class head, 11.18M without).

    Args:
        in_channels: image channels (3 for ImageNet weights).
        num_classes: when given, ``fc`` maps the 512 pooled features to logits;
            when ``None`` there is no ``fc`` and the output is the features.
        width: channels of ``layer1`` (64); later layers double it.

    Shapes:
        input ``[N, in_channels, H, W]`` (224x224 for ImageNet, any size >= 32)
        -> ``[N, 8 * width]`` features (``[N, 512]``) or ``[N, num_classes]``.

    Example:
        >>> ResNet18()(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 512])
    """

    def __init__(self, in_channels: int = 3, num_classes: int | None = None, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [width, width * 2, width * 4, width * 8]
        layers, previous = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(previous, w, stride), BasicBlock(w, w)))
            previous = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        self.fc = nn.Linear(self.out_features, num_classes) if num_classes is not None else None
        _init_weights(self, "relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        z = torch.flatten(self.avgpool(x), 1)
        return self.fc(z) if self.fc is not None else z


#: Renames that make torchvision / timm ResNet checkpoints fit: strip the ``module.`` prefix of
#: DataParallel / DistributedDataParallel checkpoints and timm's ``model.`` wrapper prefix.
TORCHVISION_RESNET_RULES: list[tuple[str, str]] = [(r"^module\.", ""), (r"^model\.", "")]


def load_torchvision_resnet(model: ResNet18, state_dict: Mapping[str, Tensor]) -> MappedLoad:
    """Load a torchvision/timm ``resnet18`` state dict into :class:`ResNet18`.

    The classifier ``fc.*`` is dropped when ``model`` has no head; a model
    with a head must match the checkpoint's class count.

    Raises:
        CheckpointError: listing unmatched keys on both sides (e.g. a resnet34
            checkpoint, or ``in_channels`` other than the checkpoint's).

    Example:
        >>> net = ResNet18()                      # features only
        >>> load_torchvision_resnet(net, torch.load("resnet18-f37072fd.pth", weights_only=True))
    """
    ignore = [r"(module\.|model\.)?fc\..*"] if model.fc is None else []
    return load_state_dict_mapped(model, state_dict, rules=TORCHVISION_RESNET_RULES, ignore=ignore)


@register_backbone("resnet12")
def resnet12(**kwargs: object) -> ResNet12:
    """ResNet-12, 64-160-320-640 channels (see :class:`ResNet12` for arguments)."""
    return ResNet12(**kwargs)  # type: ignore[arg-type]


@register_backbone("resnet18")
def resnet18(**kwargs: object) -> ResNet18:
    """ResNet-18 with torchvision parameter names (see :class:`ResNet18` for arguments)."""
    return ResNet18(**kwargs)  # type: ignore[arg-type]
