"""Conv4: the four-block CNN of Vinyals et al. 2016, Snell et al. 2017 and Finn et al. 2017."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaxfer.backbones.registry import register_backbone


class ChannelAffine(nn.Module):
    """Per-channel scale and shift, ``x * weight + bias`` over ``[N, C, H, W]``.

    BatchNorm without affine followed by this layer computes exactly what an
    affine BatchNorm computes; it exists because second-order gradients of an
    affine ``batch_norm`` under ``torch.func.vmap`` are slightly wrong
    (functorch issue #534), while this split form is exact.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def conv_block(in_channels: int, out_channels: int, norm: str, downsample: str, track_running_stats: bool) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool (or a stride-2 conv when ``downsample="stride"``)."""
    stride = 2 if downsample == "stride" else 1
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)]
    if norm == "batchnorm":
        layers.append(nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats))
    elif norm == "batchnorm_split":
        layers += [nn.BatchNorm2d(out_channels, affine=False, track_running_stats=track_running_stats), ChannelAffine(out_channels)]
    elif norm != "none":
        raise ValueError(f"norm must be 'batchnorm', 'batchnorm_split' or 'none', got {norm!r}")
    layers.append(nn.ReLU())
    if downsample == "maxpool":
        layers.append(nn.MaxPool2d(2))
    elif downsample != "stride":
        raise ValueError(f"downsample must be 'maxpool' or 'stride', got {downsample!r}")
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Four blocks of [3x3 conv (``hidden`` channels), BatchNorm, ReLU, 2x2 max-pool].

    Used by Prototypical Networks (Snell et al. 2017) as a feature extractor
    and by MAML (Finn et al. 2017) with a linear classifier on top.

    Args:
        in_channels: image channels (1 for Omniglot).
        hidden: channels of every conv layer (64 in the papers).
        num_classes: when given, a linear head maps the flattened features to
            ``num_classes`` logits; when ``None`` the output is the features.
        norm: ``"batchnorm"`` (affine BatchNorm), ``"batchnorm_split"``
            (BatchNorm without affine + :class:`ChannelAffine`; exact under
            ``vmap`` second-order gradients) or ``"none"``.
        downsample: ``"maxpool"`` (papers' ProtoNet/Omniglot) or ``"stride"``
            (stride-2 convolutions, MAML's Omniglot variant).
        track_running_stats: keep BatchNorm running statistics (used in
            ``eval()`` mode); ``False`` always normalises with batch statistics.
        image_size: input height = width, used to size the linear head.

    Shapes:
        input ``[N, in_channels, H, W]`` -> ``[N, hidden * (H // 16) ** 2]`` features
        (``[N, 64]`` for 28x28 inputs), or ``[N, num_classes]`` logits.

    Example:
        >>> Conv4(in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        num_classes: int | None = None,
        norm: str = "batchnorm",
        downsample: str = "maxpool",
        track_running_stats: bool = True,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        channels = [in_channels, hidden, hidden, hidden, hidden]
        self.features = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], norm, downsample, track_running_stats) for i in range(4))
        )
        side = image_size
        for _ in range(4):
            side = side // 2 if downsample == "maxpool" else (side + 1) // 2
        self.out_features = hidden * side * side
        self.head = nn.Linear(self.out_features, num_classes) if num_classes is not None else None

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x).flatten(1)
        return self.head(z) if self.head is not None else z


@register_backbone("conv4")
def conv4(**kwargs: object) -> Conv4:
    """Conv4 with 64 channels (see :class:`Conv4` for arguments)."""
    return Conv4(**kwargs)  # type: ignore[arg-type]
