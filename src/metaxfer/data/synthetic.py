"""Synthetic image classes for smoke tests and examples: Gaussian clusters around random patterns."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2, "trainval": 3}


class ClusterImages:
    """Each class is a random ``[C, H, W]`` pattern; its examples are the pattern plus Gaussian noise.

    Splits draw their class patterns from different seeds, so train, val and
    test classes are disjoint, like a real few-shot benchmark.

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` (or ``"trainval"``).
        num_classes: classes in this split.
        per_class: examples per class.
        image_size: ``H = W``.
        channels: ``C``.
        noise: standard deviation of the per-example noise (class patterns have std 1).
        seed: base seed.

    Example:
        >>> data = ClusterImages("train", num_classes=20, per_class=10, image_size=28)
        >>> data.gather(torch.tensor([0, 1])).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, split: str = "train", num_classes: int = 20, per_class: int = 10, image_size: int = 28,
                 channels: int = 1, noise: float = 0.5, seed: int = 0) -> None:
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
        g = torch.Generator().manual_seed(seed * 10 + SPLIT_OFFSETS[split])
        centres = torch.randn(num_classes, channels, image_size, image_size, generator=g)
        noise_t = noise * torch.randn(num_classes, per_class, channels, image_size, image_size, generator=g)
        self.images: Tensor = (centres[:, None] + noise_t).reshape(-1, channels, image_size, image_size)
        self.labels: Tensor = torch.arange(num_classes).repeat_interleave(per_class)
        self.class_names = [f"{split}-{c}" for c in range(num_classes)]
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def gather(self, indices: Tensor) -> Tensor:
        """Images at ``indices`` (``[k]``) as ``[k, C, H, W]``."""
        return self.images[indices]

    def describe(self) -> dict[str, Any]:
        """What identifies this dataset in a result record."""
        return {"dataset": "clusters", "split": self.split, "classes": len(self.class_names), "examples": len(self)}
