"""The embedding module of Relation Networks (Sung et al. 2018): Conv4 that keeps spatial feature maps."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metaxfer.backbones.conv4 import _channels_last_ok, _Conv2d
from metaxfer.backbones.registry import register_backbone
from metaxfer.errors import ConfigError

__all__ = ["RelationConv4", "relation_conv4", "relation_init"]


def relation_init(module: nn.Module) -> None:
    """The initialisation of the authors' code (LearningToCompare_FSL ``weights_init``).

    Conv: ``N(0, sqrt(2 / (k*k*out_channels)))`` weights, zero bias; BatchNorm:
    weight 1, bias 0; Linear: ``N(0, 0.01)`` weights, bias 1 (so the relation
    module starts with positive pre-activations, not dead ReLUs).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.ones_(m.bias)


class RelationConv4(nn.Module):
    """Four blocks of [3x3 conv, BatchNorm, ReLU], 2x2 max-pool after the first two only.

    Sung, Yang, Zhang, Xiang, Torr & Hospedales, "Learning to Compare: Relation
    Network for Few-Shot Learning", CVPR 2018, figure 2: the last two blocks
    keep the resolution so the relation module compares feature maps. As in the
    authors' code, the first two convolutions are unpadded and the last two
    padded: 28x28 Omniglot gives ``64 x 5 x 5`` maps (28 -> 26 -> 13 -> 11 -> 5
    -> 5 -> 5), 84x84 miniImageNet ``64 x 19 x 19``.

    Args:
        in_channels: image channels (1 for Omniglot).
        hidden: channels of every conv layer (64 in the paper).
        image_size: input height = width, to compute :attr:`feature_shape`.

    The pooled blocks run conv -> BatchNorm -> max-pool -> ReLU, the CPU
    activations are channels-last and the first convolution's bias is added
    after it, as in :class:`~metaxfer.backbones.conv4.Conv4` (same function,
    same ``state_dict`` keys as the paper's order; see ``conv_block`` there).

    Attributes:
        feature_shape: ``(hidden, side, side)``, the output shape of one image
            (read by :class:`~metaxfer.learners.relation.RelationNet` to size its relation module).

    Shapes:
        ``[N, in_channels, H, W] -> [N, hidden, side, side]``.

    Example:
        >>> RelationConv4(in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 64, 5, 5])
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()

        def block(c_in: int, pad: int, pool: bool) -> nn.Sequential:
            # ReLU after the pool: relu(maxpool(x)) == maxpool(relu(x)) exactly, on a quarter of the elements.
            layers: list[nn.Module] = [_Conv2d(c_in, hidden, 3, padding=pad), nn.BatchNorm2d(hidden)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []), nn.ReLU())

        self.features = nn.Sequential(block(in_channels, 0, True), block(hidden, 0, True),
                                      block(hidden, 1, False), block(hidden, 1, False))
        side = ((image_size - 2) // 2 - 2) // 2
        if side < 1:
            raise ConfigError(f"image_size={image_size} is too small for the Relation Network embedding "
                              "(two unpadded convolutions and two 2x2 pools); use image_size >= 10")
        self.feature_shape: tuple[int, int, int] = (hidden, side, side)
        relation_init(self)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, C, H, W] -> [N, hidden, side, side]``."""
        if not torch.jit.is_scripting():
            x = self._fast_layout(x)
        return self.features(x)

    @torch.jit.unused
    def _fast_layout(self, x: Tensor) -> Tensor:
        # Channels-last activations: oneDNN's convolution, BatchNorm and max-pool kernels are faster in NHWC
        # on CPU (a 20-way Relation Networks training step: 1.3x, benchmarks/speed_relation.py).
        return x.to(memory_format=torch.channels_last) if _channels_last_ok(x) else x


@register_backbone("relation_conv4")
def relation_conv4(in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> RelationConv4:
    """The ``"relation_conv4"`` backbone (see :class:`RelationConv4`)."""
    return RelationConv4(in_channels, hidden, image_size)
