"""The unit of few-shot learning: one task's support and query sets."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Episode(NamedTuple):
    """A few-shot task (or a stack of tasks).

    Labels are episode-local: ``0 .. ways-1``, grouped by class (all shots of
    class 0 first, then class 1, ...). Regression tasks (sinusoids) carry
    floating-point targets with an output dimension instead: ``support_y``
    ``[S, out]`` / ``[T, S, out]``, ``query_y`` ``[Q, out]`` / ``[T, Q, out]``.

    Shapes, for one task / for a meta-batch of ``T`` tasks:
        support_x: ``[ways*shots, *x_shape]`` / ``[T, ways*shots, *x_shape]``
        support_y: ``[ways*shots]`` / ``[T, ways*shots]`` (int64)
        query_x: ``[ways*queries, *x_shape]`` / ``[T, ways*queries, *x_shape]``
        query_y: ``[ways*queries]`` / ``[T, ways*queries]`` (int64)

    Example:
        >>> ep = Episode(torch.zeros(5, 1, 28, 28), torch.arange(5), torch.zeros(10, 1, 28, 28), torch.arange(5).repeat(2))
        >>> ep.ways
        5
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def is_batched(self) -> bool:
        """True when the tensors carry a leading task dimension."""
        # Class labels are [S] per task; regression targets keep an output dimension, [S, out].
        return self.support_y.dim() == (3 if self.support_y.is_floating_point() else 2)

    @property
    def num_tasks(self) -> int:
        """Number of tasks (1 for an unbatched episode)."""
        return self.support_y.shape[0] if self.is_batched else 1

    @property
    def ways(self) -> int:
        """Number of classes per task (0 for regression tasks, whose targets are floating point)."""
        if self.support_y.is_floating_point():
            return 0
        y = self.support_y[0] if self.is_batched else self.support_y
        return int(y.max().item()) + 1 if y.numel() else 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """Move every tensor to ``device``."""
        return Episode(*(t.to(device, non_blocking=non_blocking) for t in self))

    def task(self, i: int) -> Episode:
        """The ``i``-th task of a batched episode, without the task dimension."""
        if not self.is_batched:
            raise IndexError("task(i) needs a batched episode ([tasks, ...]); this one holds a single task")
        return Episode(*(t[i] for t in self))

    def batch(self) -> Episode:
        """This episode with a leading task dimension of size 1 (no-op if already batched)."""
        return self if self.is_batched else Episode(*(t.unsqueeze(0) for t in self))


def stack_episodes(episodes: list[Episode]) -> Episode:
    """Stack single-task episodes of equal sizes into one batched episode ``[T, ...]``."""
    if not episodes:
        raise ValueError("stack_episodes needs at least one episode")
    return Episode(*(torch.stack(parts) for parts in zip(*episodes)))
