"""Learner registry: ``create_learner("protonet", backbone)``."""

from __future__ import annotations

from typing import Any

from torch import nn

from metaxfer.learners.base import Learner
from metaxfer.registry import Registry

LEARNERS: Registry[Learner] = Registry("learner")
register_learner = LEARNERS.register


def create_learner(name: str, backbone: nn.Module, **kwargs: Any) -> Learner:
    """Build a registered learner around ``backbone`` (the feature extractor or model)."""
    return LEARNERS.create(name, backbone=backbone, **kwargs)
