"""Backbones and their registry."""

from metaxfer.backbones.conv4 import ChannelAffine, Conv4
from metaxfer.backbones.convert import load_state_dict_mapped
from metaxfer.backbones.efficientnet_lite import EfficientNetLite
from metaxfer.backbones.mlp import MLP
from metaxfer.backbones.registry import (
    BACKBONES,
    create,
    list_backbones,
    register_backbone,
)
from metaxfer.backbones.relation_conv4 import RelationConv4
from metaxfer.backbones.resnet import ResNet12, ResNet18

__all__ = [
    "BACKBONES", "MLP", "ChannelAffine", "Conv4", "EfficientNetLite", "RelationConv4", "ResNet12", "ResNet18", "create",
    "list_backbones", "load_state_dict_mapped", "register_backbone",
]
