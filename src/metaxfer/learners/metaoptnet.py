"""MetaOptNet (Lee, Maji, Ravichandran & Soatto, CVPR 2019) with a ridge (R2-D2) or Crammer-Singer SVM head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.functional.convex import crammer_singer_svm, gram, ridge_dual
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import (
    EvalModule,
    check_support_classes,
    embed_tasks,
    episode_ways,
)
from metaxfer.tasks.episode import Episode

__all__ = ["LinearPredictor", "MetaOptNet", "metaoptnet"]

HEADS = ("ridge", "svm")


class LinearPredictor:
    """Adapted linear base learner for one task: ``logits = scale * (features @ W) + bias``."""

    def __init__(self, backbone: nn.Module, weight: Tensor, scale: Tensor, bias: Tensor) -> None:
        self.backbone = EvalModule(backbone)
        self.weight = weight  # [D, ways] primal weights W = X^T alpha, detached
        self.scale = scale
        self.bias = bias

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> logits [Q, ways]``."""
        return self.scale * (self.backbone(query_x).flatten(1) @ self.weight) + self.bias


class MetaOptNet(Learner):
    """Meta-learning with differentiable convex optimisation (Lee et al., CVPR 2019).

    "Meta-Learning with Differentiable Convex Optimization",
    https://arxiv.org/abs/1904.03758. For every task a linear classifier is fit
    to the support embeddings by a convex problem whose solution is
    differentiable in the embeddings; the query cross-entropy of its logits
    trains the backbone. Not transductive; no inner-loop gradients
    (``order = None``: the base learner is solved, not trained by SGD).

    Heads (both in the ``S x S`` kernel space of the support set, see
    :mod:`metaxfer.functional.convex`):

    * ``"ridge"``: R2-D2 (Bertinetto et al., ICLR 2019), one-hot ridge regression
      ``W = X^T (X X^T + lambda I)^-1 Y`` (Woodbury), logits
      ``scale * q W + bias`` with learnable scale and bias as in R2-D2 and
      ``lambda = 50`` as in MetaOptNet's ridge head (``learn_lambda=True``
      meta-learns ``log lambda`` as R2-D2 does). The bias shifts every class's
      logit alike, so it changes neither the softmax cross-entropy (its
      gradient is exactly 0) nor the argmax; it is kept for parity with R2-D2
      and matters only to losses that are not shift-invariant.
    * ``"svm"``: the Crammer-Singer multi-class SVM (``C = 0.1`` as MetaOptNet),
      dual solved by FISTA with restarts (MetaOptNet uses the qpth interior-point
      QP solver, not available here); logits ``scale * q W`` with a learnable
      scale (MetaOptNet has no bias).

    Args:
        backbone: any module mapping ``[N, *x_shape]`` to features (flattened to ``[N, D]``).
        head: ``"ridge"`` or ``"svm"``.
        ridge_lambda: the ridge penalty (initial value when learnt).
        learn_lambda: meta-learn the ridge penalty.
        svm_c: the SVM's ``C``.
        svm_iterations: maximum FISTA steps during ``loss`` (unrolled for the gradient).
        svm_eval_iterations: maximum FISTA steps in ``adapt`` (no gradient needed).
        svm_tol: stop early once every task's relative duality gap is at most
            this (checked every 10 steps); ``None`` always runs the maximum.
        scale: initial logit scale (1.0 in MetaOptNet's code).
        label_smoothing: ``eps`` of MetaOptNet's smoothed targets (``1 - eps`` on
            the true class, ``eps / (ways - 1)`` on each other); 0 disables.

    Shapes:
        ``loss(batch)``: ``support_x [T, ways*shots, *x_shape]``, ``query_x [T, ways*queries, *x_shape]``.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    BatchNorm: per-task batch statistics (support and query together) in
    training, running statistics in ``adapt`` and the predictor.

    Raises:
        ConfigError: an unknown head or a non-positive hyper-parameter.
        EpisodeError: a class ``0 .. ways-1`` without a support example.

    Example:
        >>> learner = MetaOptNet(metaxfer.backbones.create("conv4", in_channels=1), head="svm")
        >>> loss = learner.loss(sampler.sample_batch(8))
        >>> learner.adapt(support_x, support_y)(query_x).argmax(-1)
    """

    def __init__(self, backbone: nn.Module, head: str = "svm", ridge_lambda: float = 50.0, learn_lambda: bool = False,
                 svm_c: float = 0.1, svm_iterations: int = 200, svm_eval_iterations: int = 1000,
                 svm_tol: float | None = 1e-4, scale: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"unknown MetaOptNet head {head!r}; choose one of {list(HEADS)}")
        if ridge_lambda <= 0 or svm_c <= 0 or svm_iterations < 1 or svm_eval_iterations < 1:
            raise ConfigError(
                f"ridge_lambda and svm_c must be > 0 and svm_iterations, svm_eval_iterations >= 1; got "
                f"ridge_lambda={ridge_lambda}, svm_c={svm_c}, svm_iterations={svm_iterations}, "
                f"svm_eval_iterations={svm_eval_iterations}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.backbone = backbone
        self.head = head
        self.svm_c, self.svm_tol = float(svm_c), svm_tol
        self.svm_iterations, self.svm_eval_iterations = svm_iterations, svm_eval_iterations
        self.label_smoothing = label_smoothing
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        # R2-D2 learns a bias; MetaOptNet's SVM head has none (kept as a buffer so both heads load alike).
        if head == "ridge":
            self.bias = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_buffer("bias", torch.tensor(0.0))
        if learn_lambda:
            self.log_lambda = nn.Parameter(torch.tensor(math.log(ridge_lambda)))
        else:
            self.register_buffer("log_lambda", torch.tensor(math.log(ridge_lambda)))
        self.last_metrics: dict[str, float] = {}

    @property
    def ridge_lambda(self) -> Tensor:
        """The ridge penalty ``lambda`` (a scalar tensor; learnt in log space when ``learn_lambda``)."""
        return self.log_lambda.exp()

    def dual(self, support: Tensor, support_y: Tensor, ways: int, iterations: int) -> Tensor:
        """Dual coefficients ``alpha [T, S, ways]`` of the head on ``support [T, S, D]``; ``W = X^T alpha``."""
        kernel = gram(support, support)
        onehot = F.one_hot(support_y, ways).to(support.dtype)
        if self.head == "ridge":
            return ridge_dual(kernel, onehot, self.ridge_lambda)
        return crammer_singer_svm(kernel, onehot, self.svm_c, iterations=iterations, tol=self.svm_tol)

    def task_logits(self, support: Tensor, support_y: Tensor, query: Tensor, ways: int) -> Tensor:
        """Logits ``[T, Q, ways]`` from features ``support [T, S, D]``, ``query [T, Q, D]`` (differentiable)."""
        alpha = self.dual(support, support_y, ways, self.svm_iterations)
        return self.scale * (gram(query, support) @ alpha) + self.bias

    def loss(self, batch: Episode) -> Tensor:
        """Mean query cross-entropy over the tasks of ``batch`` (``[T, ...]`` tensors)."""
        batch = batch.batch()
        ways = episode_ways(batch)
        zs, zq = embed_tasks(self.backbone, batch)
        logits = self.task_logits(zs.flatten(2), batch.support_y, zq.flatten(2), ways)
        # MetaOptNet's smoothing (1 - eps, eps / (ways - 1)) is torch's with eps * ways / (ways - 1).
        smoothing = self.label_smoothing * ways / (ways - 1) if ways > 1 else 0.0
        loss = F.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten(), label_smoothing=smoothing)
        with torch.no_grad():
            self.last_metrics = {"accuracy": (logits.argmax(-1) == batch.query_y).float().mean().item()}
        return loss

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> LinearPredictor:
        """Solve one task's base learner on its support features (no parameters change)."""
        ways = check_support_classes(support_y)
        x = EvalModule(self.backbone)(support_x).flatten(1)
        alpha = self.dual(x.unsqueeze(0), support_y.unsqueeze(0), ways, self.svm_eval_iterations)[0]
        return LinearPredictor(self.backbone, x.t() @ alpha, self.scale.detach().clone(), self.bias.detach().clone())


@register_learner("metaoptnet")
def metaoptnet(backbone: nn.Module, head: str = "svm", ridge_lambda: float = 50.0, learn_lambda: bool = False,
               svm_c: float = 0.1, svm_iterations: int = 200, svm_eval_iterations: int = 1000,
               svm_tol: float | None = 1e-4, scale: float = 1.0, label_smoothing: float = 0.0) -> MetaOptNet:
    """MetaOptNet around ``backbone`` with a ``"ridge"`` or ``"svm"`` head (see :class:`MetaOptNet`)."""
    return MetaOptNet(backbone, head, ridge_lambda, learn_lambda, svm_c, svm_iterations, svm_eval_iterations,
                      svm_tol, scale, label_smoothing)
