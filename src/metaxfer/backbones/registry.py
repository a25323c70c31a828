"""Backbone registry: ``create("conv4", in_channels=1)``."""

from __future__ import annotations

from typing import Any

from torch import nn

from metaxfer.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")
register_backbone = BACKBONES.register


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name.

    Example:
        >>> net = create("conv4", in_channels=1)          # images -> [N, 64] features
        >>> net = create("conv4", in_channels=1, num_classes=5)  # images -> [N, 5] logits
    """
    return BACKBONES.create(name, **kwargs)


def list_backbones() -> list[str]:
    """Names of all registered backbones."""
    return BACKBONES.names()
