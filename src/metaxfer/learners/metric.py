"""Metric-based learners: classify queries by distance to support embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.functional.distances import prototypes, squared_euclidean
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import EvalModule, check_support_classes, episode_ways
from metaxfer.tasks.episode import Episode


class PrototypePredictor:
    """Adapted ProtoNet for one task: logits are negative squared distances to the prototypes."""

    def __init__(self, backbone: Callable[[Tensor], Tensor], protos: Tensor) -> None:
        self.backbone = backbone
        self.prototypes = protos  # [ways, D], detached

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> logits [Q, ways]``."""
        return -squared_euclidean(self.backbone(query_x), self.prototypes)


class ProtoNet(Learner):
    """Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

    Each class is represented by the mean of its support embeddings; a query
    is classified by softmax over negative squared Euclidean distances to the
    prototypes. Not transductive; no inner-loop gradients (``order = None``).

    Args:
        backbone: any module mapping ``[N, *x_shape]`` inputs to ``[N, D]`` features.

    Shapes:
        ``loss(batch)``: ``support_x [T, ways*shots, *x_shape]``, ``query_x [T, ways*queries, *x_shape]``.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    BatchNorm: training uses batch statistics of each task's support and query
    examples together (as the paper's code); ``adapt`` embeds in ``eval()`` mode,
    so predictions use running statistics and never the query set's.

    Example:
        >>> learner = ProtoNet(metaxfer.backbones.create("conv4", in_channels=1))
        >>> loss = learner.loss(sampler.sample_batch(1))
        >>> predict = learner.adapt(support_x, support_y)
        >>> predict(query_x).argmax(-1)
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.last_metrics: dict[str, float] = {}

    def task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        """Logits ``[Q, ways]`` of one task, differentiable (one forward over support and query)."""
        s = support_x.shape[0]
        z = self.backbone(torch.cat([support_x, query_x]))
        protos = prototypes(z[:s], support_y)
        return -squared_euclidean(z[s:], protos)

    def loss(self, batch: Episode) -> Tensor:
        """Mean query cross-entropy over the tasks of ``batch`` (``[T, ...]`` tensors)."""
        batch = batch.batch()
        episode_ways(batch)  # a class without support examples would give a NaN prototype: say so instead
        losses, correct = [], 0.0
        # Tasks run one at a time so BatchNorm statistics stay per task (as in the paper).
        for t in range(batch.num_tasks):
            loss, logits = self.task_loss(batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t])
            losses.append(loss)
            correct += (logits.argmax(-1) == batch.query_y[t]).float().mean().item()
        self.last_metrics = {"accuracy": correct / batch.num_tasks}
        return torch.stack(losses).mean()

    def task_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor) -> tuple[Tensor, Tensor]:
        """One task's training loss (query cross-entropy) and its logits ``[Q, ways]``.

        The hook subclasses override to add terms of their own (see
        :class:`~metaxfer.learners.hallucination.HallucinationNet`'s VAE loss).
        """
        logits = self.task_logits(support_x, support_y, query_x)
        return F.cross_entropy(logits, query_y), logits

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> PrototypePredictor:
        """Compute the prototypes of one task's support set (no parameters change)."""
        check_support_classes(support_y)
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            protos = prototypes(self.backbone(support_x), support_y)
        finally:
            self.backbone.train(was_training)
        return PrototypePredictor(EvalModule(self.backbone), protos)


@register_learner("protonet")
def protonet(backbone: nn.Module) -> ProtoNet:
    """ProtoNet around ``backbone`` (see :class:`ProtoNet`)."""
    return ProtoNet(backbone)
