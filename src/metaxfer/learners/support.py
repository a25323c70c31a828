"""Helpers shared by the learners that embed a task and classify its queries with a head on the embeddings.

* :func:`check_support_classes`: every class ``0 .. ways-1`` has at least one
  support example (ProtoNet, Matching Networks, Relation Networks and
  MetaOptNet would otherwise average an empty set, attend to nothing, or fit a
  classifier without positives, silently).
* :func:`embed_tasks`: one backbone pass per task over ``cat([support, query])``
  so BatchNorm statistics stay per task, as in :class:`~metaxfer.learners.metric.ProtoNet`.
* :class:`EvalModule`: call a module in ``eval()`` mode (a predictor must not
  depend on the learner's mode, nor leak query statistics through BatchNorm).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaxfer.errors import EpisodeError
from metaxfer.tasks.episode import Episode

__all__ = ["EvalModule", "check_support_classes", "embed_tasks", "episode_ways"]


def check_support_classes(support_y: Tensor, ways: int | None = None) -> int:
    """Check that every class ``0 .. ways-1`` has a support example in every task; return ``ways``.

    Args:
        support_y: ``[S]`` or ``[T, S]`` episode-local integer labels.
        ways: number of classes; inferred as ``max(support_y) + 1`` when omitted
            (pass it, e.g. from the query labels, to also catch a missing top class).

    Returns:
        ``ways``.

    Raises:
        EpisodeError: for labels outside ``0 .. ways-1`` or a class without a
            support example; the message names the task and the classes.

    Example:
        >>> check_support_classes(torch.tensor([[0, 1, 2], [2, 1, 0]]))
        3
    """
    if support_y.dtype.is_floating_point:
        raise EpisodeError("support labels must be integer class indices 0..ways-1, got floating-point targets; "
                           "this learner classifies, use a regression learner (MAML) for real-valued targets")
    labels = support_y.reshape(-1, support_y.shape[-1]) if support_y.dim() > 0 else support_y.reshape(1, 1)
    if labels.numel() == 0:
        raise EpisodeError("the support set is empty; sample episodes with at least one shot per class")
    lo, hi = int(labels.min().item()), int(labels.max().item())
    if ways is None:
        ways = hi + 1
    if lo < 0 or hi >= ways:
        raise EpisodeError(f"support labels must lie in 0..{ways - 1} (episode-local labels), got values in {lo}..{hi}; "
                           "relabel each task's classes to 0..ways-1 (EpisodeSampler does this)")
    counts = torch.zeros(labels.shape[0], ways, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    empty = (counts == 0).nonzero()
    if empty.numel():
        task = int(empty[0, 0])
        missing = sorted(int(c) for c in empty[empty[:, 0] == task, 1])
        where = f" of task {task}" if support_y.dim() > 1 else ""
        raise EpisodeError(
            f"the support set{where} has no example of class(es) {missing}; every class 0..{ways - 1} needs at "
            "least one shot: sample the support set with shots >= 1 per class (EpisodeSampler does), or relabel "
            "the classes present to consecutive labels 0..N-1"
        )
    return ways


def episode_ways(batch: Episode) -> int:
    """Classes per task of a batched classification episode, checked (support covers every query class).

    Raises:
        EpisodeError: see :func:`check_support_classes`; a query class without
            support examples counts as a missing class.
    """
    ways = int(max(batch.support_y.max().item(), batch.query_y.max().item())) + 1
    return check_support_classes(batch.support_y, ways)


def embed_tasks(backbone: nn.Module, batch: Episode) -> tuple[Tensor, Tensor]:
    """Support and query embeddings of every task of ``batch``, one backbone pass per task.

    Tasks run one at a time so BatchNorm statistics stay per task (as in the
    papers); the heads then run batched over the stacked ``[T, ...]`` features.

    Args:
        backbone: ``[N, *x_shape] -> [N, *feature_shape]``.
        batch: batched episode, ``support_x [T, S, *x_shape]``, ``query_x [T, Q, *x_shape]``.

    Returns:
        ``(support [T, S, *feature_shape], query [T, Q, *feature_shape])``.
    """
    s = batch.support_x.shape[1]
    zs, zq = [], []
    for t in range(batch.num_tasks):
        z = backbone(torch.cat([batch.support_x[t], batch.query_x[t]]))
        zs.append(z[:s])
        zq.append(z[s:])
    return torch.stack(zs), torch.stack(zq)


class EvalModule:
    """Calls ``module`` in eval mode and restores its previous mode afterwards.

    Predictors hold one per module they call, so their outputs never depend on
    the learner's mode and BatchNorm uses running statistics, not the query set's.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Tensor) -> Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            return self.module(*args)
        finally:
            self.module.train(was_training)
