"""Backbones and their registry."""

from metaxfer.backbones.conv4 import ChannelAffine, Conv4
from metaxfer.backbones.mlp import MLP
from metaxfer.backbones.registry import (
    BACKBONES,
    create,
    list_backbones,
    register_backbone,
)

__all__ = ["BACKBONES", "MLP", "ChannelAffine", "Conv4", "create", "list_backbones", "register_backbone"]
