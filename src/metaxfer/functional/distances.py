"""Pure tensor maths of metric-based few-shot learning."""

from __future__ import annotations

import torch
from torch import Tensor


def prototypes(features: Tensor, labels: Tensor, ways: int | None = None) -> Tensor:
    """Class means of support features (Snell et al. 2017, eq. 1).

    Args:
        features: ``[..., S, D]`` support embeddings.
        labels: ``[..., S]`` episode-local labels in ``0 .. ways-1``.
        ways: number of classes; inferred from ``labels`` when omitted.

    Returns:
        ``[..., ways, D]`` prototypes.

    Raises:
        ValueError: when a class in ``0 .. ways-1`` has no support example.
    """
    if ways is None:
        ways = int(labels.max().item()) + 1
    onehot = torch.nn.functional.one_hot(labels, ways).to(features.dtype)  # [..., S, ways]
    counts = onehot.sum(dim=-2)  # [..., ways]
    if bool((counts == 0).any()):
        missing = sorted(set(torch.nonzero(counts == 0)[:, -1].tolist()))
        raise ValueError(f"support set has no example of class(es) {missing}; every class 0..{ways - 1} needs at least one shot")
    return (onehot.transpose(-1, -2) @ features) / counts.unsqueeze(-1)


def squared_euclidean(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances.

    Args:
        x: ``[..., N, D]``.
        y: ``[..., M, D]``.

    Returns:
        ``[..., N, M]`` with ``d[n, m] = ||x_n - y_m||^2``.
    """
    # Expanded form ||x||^2 - 2 x.y + ||y||^2 is one matmul instead of an [N, M, D]
    # difference tensor; clamp removes tiny negatives from cancellation.
    xx = (x * x).sum(-1, keepdim=True)
    yy = (y * y).sum(-1).unsqueeze(-2)
    return (xx - 2.0 * x @ y.transpose(-1, -2) + yy).clamp_min(0.0)
