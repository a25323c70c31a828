"""Baseline and Baseline++ (Chen et al. 2019, "A Closer Look at Few-shot Classification", ICLR).

Pretrain a backbone with an ordinary classifier over all base (training)
classes, on supervised mini-batches from
:class:`~metaxfer.tasks.supervised.ClassBatchSampler`; at test time freeze the
backbone and train a new classifier on the support set of each task. The
pretraining goes through the same :func:`metaxfer.fit` loop and the
evaluation through the same :func:`metaxfer.evaluate` episodes as the
meta-learners.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import EvalModule, check_support_classes
from metaxfer.tasks.episode import Episode
from metaxfer.transfer.heads import HEADS, CosineClassifier, fit_head

__all__ = ["Baseline", "BaselinePlusPlus", "HeadPredictor", "backbone_feature_dim", "supervised_examples"]


def backbone_feature_dim(backbone: nn.Module, given: int | None = None) -> int:
    """``D`` of the backbone's ``[N, D]`` features: ``given``, else ``backbone.out_features``.

    Raises:
        ConfigError: when neither is known.
    """
    if given is not None:
        return int(given)
    dim = getattr(backbone, "out_features", None)
    if not isinstance(dim, int):
        raise ConfigError(f"cannot tell the feature size of backbone {type(backbone).__name__}: give "
                          "learner_args.feature_dim (the D of its [N, D] output)")
    return dim


class HeadPredictor:
    """A frozen backbone followed by a head fitted to one task: ``query_x [Q, *x_shape] -> logits [Q, ways]``."""

    def __init__(self, backbone: Callable[[Tensor], Tensor], head: nn.Module) -> None:
        self.backbone = backbone
        self.head = head

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        return self.head(self.backbone(query_x))


def _check_int(name: str, value: object, minimum: int, hint: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}; {hint}")
    return value


def supervised_examples(batch: Episode, num_base_classes: int, learner: str, classifier: str,
                        fix: str) -> tuple[Tensor, Tensor]:
    """The images ``[T*B, *x_shape]`` and global labels ``[T*B]`` of a supervised pretraining batch, checked.

    Args:
        batch: a :class:`~metaxfer.tasks.supervised.ClassBatchSampler` batch: examples as the
            support set (``[T, B, ...]`` or ``[B, ...]``), no queries.
        num_base_classes: labels must lie in ``0 .. num_base_classes-1``.
        learner: the learner's name, for the error messages.
        classifier: what classifies the base classes (``"the classifier has"``), for the label error.
        fix: what to change when a label is out of range.

    Raises:
        ConfigError: an episode with queries (episode-local labels): pretraining needs ``train.sampler: classes``.
        EpisodeError: a label outside ``0 .. num_base_classes-1``.
    """
    batch = batch.batch()
    if batch.query_y.numel() != 0:
        raise ConfigError(f"{learner} pretrains on supervised batches with global labels, got an episode with "
                          "queries (episode-local labels); set train.sampler: classes (and train.batch_size) or use "
                          "metaxfer.ClassBatchSampler")
    x = batch.support_x.reshape(-1, *batch.support_x.shape[2:])
    y = batch.support_y.reshape(-1)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_base_classes:
        raise EpisodeError(f"a pretraining label is {hi if hi >= num_base_classes else lo} but {classifier} "
                           f"num_base_classes={num_base_classes}; {fix}")
    return x, y


class Baseline(Learner):
    """Baseline (Chen et al. 2019, "A Closer Look at Few-shot Classification", ICLR, section 3.1).

    Pretraining (``loss``): cross-entropy of a linear classifier over all
    ``num_base_classes`` base classes on a supervised mini-batch with global
    labels (see :mod:`metaxfer.tasks.supervised`). Adaptation (``adapt``): the
    backbone is frozen (support features computed once, in ``eval()`` mode) and
    a NEW head is trained from scratch on them — ``finetune_epochs`` passes of
    SGD in mini-batches of ``finetune_batch_size`` (paper: 100, batch 4, learning
    rate 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3; see
    :func:`~metaxfer.transfer.heads.fit_head`). The head's initialisation and
    the batch order come from a generator seeded with ``adapt_seed``, so the
    same support set always gives the same predictor. Not transductive; no
    inner-loop gradients through the backbone (``order = None``).

    Args:
        backbone: any module mapping ``[N, *x_shape]`` to ``[N, D]`` features.
        num_base_classes: classes of the pretraining split (4112 for Omniglot
            vinyals: 1028 characters x 4 rotations).
        classifier: the pretraining head, ``"linear"`` (Baseline) or ``"cosine"`` (Baseline++).
        adapt_head: the head fitted at test time: ``"linear"``, ``"cosine"``,
            ``"centroid"`` (nearest normalised centroid) or ``"logreg"``
            (logistic regression by L-BFGS); defaults to ``classifier``.
        feature_dim: ``D``; read from ``backbone.out_features`` when omitted.
        scale: the pretraining cosine head's scale; ``None`` follows the
            released code (2 for at most 200 classes, 10 above: 10 over
            Omniglot's 4112 classes).
        learn_scale: train the pretraining cosine head's scale.
        adapt_scale: the adaptation cosine head's scale; ``None``: the same
            rule for ``ways`` classes (2 for a 5-way task).
        finetune_epochs, finetune_batch_size, finetune_lr: the adaptation SGD.
        adapt_seed: seed of the adaptation generator.

    Shapes:
        ``loss(batch)``: ``support_x [T, B, *x_shape]``, ``support_y [T, B]`` global labels
        in ``0 .. num_base_classes-1``, empty query tensors.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    Raises:
        ConfigError: for invalid sizes or head names.

    Example:
        >>> learner = Baseline(metaxfer.create_backbone("conv4", in_channels=1), num_base_classes=4112)
        >>> loss = learner.loss(ClassBatchSampler(train_set, batch_size=64).sample_batch(1))
        >>> predict = learner.adapt(support_x, support_y)
        >>> predict(query_x).argmax(-1)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_base_classes: int | None = None,
        classifier: str = "linear",
        adapt_head: str | None = None,
        feature_dim: int | None = None,
        scale: float | None = None,
        learn_scale: bool = False,
        adapt_scale: float | None = None,
        finetune_epochs: int = 100,
        finetune_batch_size: int = 4,
        finetune_lr: float = 0.01,
        adapt_seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("num_base_classes", num_base_classes, 2,
                   "set model.learner_args.num_base_classes to the number of classes of the training split "
                   "(4112 for omniglot vinyals: 1028 characters x 4 rotations)")
        if classifier not in ("linear", "cosine"):
            raise ConfigError(f"unknown classifier {classifier!r}; choose 'linear' (Baseline) or 'cosine' (Baseline++)")
        adapt_head = classifier if adapt_head is None else adapt_head
        if adapt_head not in HEADS:
            raise ConfigError(f"unknown adapt_head {adapt_head!r}; choose one of {', '.join(HEADS)}")
        _check_int("finetune_epochs", finetune_epochs, 0, "the paper uses 100")
        _check_int("finetune_batch_size", finetune_batch_size, 1, "the paper uses 4")
        self.backbone = backbone
        self.num_base_classes, self.classifier, self.adapt_head = num_base_classes, classifier, adapt_head
        if learn_scale and classifier != "cosine":
            raise ConfigError("learn_scale applies to the cosine classifier only; drop it or set classifier: cosine")
        self.scale, self.adapt_scale = scale, adapt_scale
        self.finetune_epochs, self.finetune_batch_size, self.finetune_lr = finetune_epochs, finetune_batch_size, finetune_lr
        self.adapt_seed = adapt_seed
        dim = backbone_feature_dim(backbone, feature_dim)
        self.head: nn.Module = (nn.Linear(dim, num_base_classes) if classifier == "linear"
                                else CosineClassifier(dim, num_base_classes, scale=scale, learn_scale=learn_scale))
        self.last_metrics: dict[str, float] = {}

    def loss(self, batch: Episode) -> Tensor:
        """Mean cross-entropy over all base classes of a supervised batch (``[T, B, ...]`` tensors).

        Raises:
            ConfigError: for an episode with queries (episode-local labels):
                pretraining needs ``train.sampler: classes``.
            EpisodeError: for labels outside ``0 .. num_base_classes-1``.
        """
        x, y = supervised_examples(batch, self.num_base_classes, type(self).__name__, "the classifier has",
                                   "set model.learner_args.num_base_classes to the number of classes of the training "
                                   "split (ClassBatchSampler.num_classes)")
        logits = self.head(self.backbone(x))
        self.last_metrics = {"accuracy": (logits.argmax(-1) == y).float().mean().item()}
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Frozen backbone features ``[N, D]`` in ``eval()`` mode (BatchNorm running statistics); mode restored."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            return self.backbone(x).detach()
        finally:
            self.backbone.train(was_training)

    def adapt(self, support_x: Tensor, support_y: Tensor) -> HeadPredictor:
        """Train a new ``adapt_head`` on the frozen support features of one task; never mutates the learner."""
        ways = check_support_classes(support_y)
        head = fit_head(self.adapt_head, self.features(support_x), support_y, ways, epochs=self.finetune_epochs,
                        batch_size=self.finetune_batch_size, lr=self.finetune_lr, seed=self.adapt_seed,
                        scale=self.adapt_scale)
        return HeadPredictor(EvalModule(self.backbone), head)


class BaselinePlusPlus(Baseline):
    """Baseline++ (Chen et al. 2019, section 3.2): :class:`Baseline` with cosine-similarity heads.

    Pretraining and adaptation both use a
    :class:`~metaxfer.transfer.heads.CosineClassifier` (normalised features and
    class weight vectors, times a scale: 10 over Omniglot's 4112 classes and 2
    for a 5-way task, as the released code), which the paper finds reduces
    intra-class variation. Arguments and shapes as :class:`Baseline`.

    Example:
        >>> learner = BaselinePlusPlus(metaxfer.create_backbone("conv4", in_channels=1), num_base_classes=4112)
    """

    def __init__(self, backbone: nn.Module, num_base_classes: int | None = None, adapt_head: str | None = "cosine", **kwargs: object) -> None:
        if "classifier" in kwargs:
            raise ConfigError("Baseline++ always pretrains a cosine classifier; drop learner_args.classifier "
                              "(or use learner 'baseline' with classifier: cosine)")
        super().__init__(backbone, num_base_classes, classifier="cosine", adapt_head=adapt_head, **kwargs)  # type: ignore[arg-type]


@register_learner("baseline")
def baseline(backbone: nn.Module, num_base_classes: int | None = None, **kwargs: object) -> Baseline:
    """Baseline around ``backbone`` (see :class:`Baseline`)."""
    return Baseline(backbone, num_base_classes, **kwargs)  # type: ignore[arg-type]


@register_learner("baseline_pp")
def baseline_pp(backbone: nn.Module, num_base_classes: int | None = None, **kwargs: object) -> BaselinePlusPlus:
    """Baseline++ around ``backbone`` (see :class:`BaselinePlusPlus`)."""
    return BaselinePlusPlus(backbone, num_base_classes, **kwargs)
