"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Importing the module also registers the "relation_conv4" backbone (the paper's embedding) wherever learners load.
from metaxfer.backbones.relation_conv4 import relation_init
from metaxfer.errors import ConfigError
from metaxfer.functional.inner_loop import without_running_stats
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import register_learner
from metaxfer.learners.support import EvalModule, check_support_classes, episode_ways
from metaxfer.tasks.episode import Episode

__all__ = ["RelationModule", "RelationNet", "RelationPredictor", "TransductiveRelationPredictor", "relation"]

LOSSES = ("mse", "cross_entropy")


class RelationModule(nn.Module):
    """The learned comparison ``g_phi`` (Sung et al. 2018, figure 2 and section 3.4).

    Two blocks of [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] on a concatenated
    (class, query) feature-map pair, then ``fc(hidden * s * s -> fc_hidden)``,
    ReLU, ``fc(fc_hidden -> 1)``. The paper applies a sigmoid to get the
    relation score in ``[0, 1]``; the module returns the pre-sigmoid logit
    (``sigmoid(logit)`` is the score) so a cross-entropy loss can use it too.

    :meth:`forward` scores every (query, class) pair of an episode without
    building the ``Q x ways`` concatenated pairs: the first convolution is
    linear in its input, ``conv([c; q]) = conv_c(c) + conv_q(q)``, so it runs
    once per class map and once per query map and the two are added per pair.
    That convolution (``2C`` input channels) held ~90 % of the module's FLOPs;
    the result is the same function as :meth:`pairs` on the concatenation.

    Args:
        feature_shape: ``(C, H, W)`` of one embedded image; the module takes ``2C`` channels.
        hidden: conv channels (64 in the paper).
        fc_hidden: width of the first fully connected layer (8 in the paper).
        padding: conv padding (1 for Omniglot's 5x5 maps, 0 for miniImageNet's 19x19, as the authors' code).

    Shapes:
        ``forward(classes [ways, C, H, W], query [Q, C, H, W]) -> [Q, ways]`` relation logits;
        ``pairs([N, 2C, H, W]) -> [N]``.
    """

    def __init__(self, feature_shape: Sequence[int], hidden: int = 64, fc_hidden: int = 8, padding: int = 1) -> None:
        super().__init__()
        if len(feature_shape) != 3 or any(int(v) < 1 for v in feature_shape):
            raise ConfigError(f"feature_shape must be the embedding's (channels, height, width), got {list(feature_shape)}; "
                              "e.g. [64, 5, 5] for relation_conv4 on 28x28 Omniglot")
        c, h, w = (int(v) for v in feature_shape)
        self.feature_shape = (c, h, w)

        def side(n: int) -> int:
            return (n + 2 * padding - 2) // 2

        out_h, out_w = side(side(h)), side(side(w))
        if out_h < 1 or out_w < 1:
            raise ConfigError(f"feature maps of shape {(c, h, w)} are too small for two 3x3 conv + 2x2 pool blocks "
                              f"with padding={padding}; use padding=1 or a larger embedding output")
        # ReLU after each max-pool (the paper: before): relu(maxpool(x)) == maxpool(relu(x)) exactly, on a
        # quarter of the elements; the parameters keep the paper's order's state_dict keys.
        self.blocks = nn.Sequential(
            nn.Conv2d(2 * c, hidden, 3, padding=padding), nn.BatchNorm2d(hidden), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=padding), nn.BatchNorm2d(hidden), nn.MaxPool2d(2), nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Linear(hidden * out_h * out_w, fc_hidden), nn.ReLU(), nn.Linear(fc_hidden, 1))
        relation_init(self)

    def forward(self, classes: Tensor, query: Tensor) -> Tensor:
        """Relation logits ``[Q, ways]`` of every (query, class) pair.

        Args:
            classes: ``[ways, C, H, W]`` class feature maps.
            query: ``[Q, C, H, W]`` query feature maps.
        """
        conv, c = self.blocks[0], self.feature_shape[0]
        from_classes = F.conv2d(classes, conv.weight[:, :c], None, conv.stride, conv.padding)  # [ways, hidden, h, w]
        from_query = F.conv2d(query, conv.weight[:, c:], conv.bias, conv.stride, conv.padding)  # [Q, hidden, h, w]
        # Pair (q, k) at row q * ways + k, the order of pairs() on the concatenation [class k; query q].
        summed = (from_query.unsqueeze(1) + from_classes.unsqueeze(0)).flatten(0, 1)
        return self.fc(self.blocks[1:](summed).flatten(1)).view(query.shape[0], classes.shape[0])

    def pairs(self, pairs: Tensor) -> Tensor:
        """Logits ``[N]`` of concatenated (class, query) pairs ``[N, 2C, H, W]`` (the paper's literal form)."""
        return self.fc(self.blocks(pairs).flatten(1)).squeeze(-1)


def class_features(support: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Per-class SUM of support feature maps (the paper's K-shot class feature, section 3.3).

    ``support [S, C, H, W]``, ``support_y [S]`` -> ``[ways, C, H, W]``.
    """
    onehot = F.one_hot(support_y, ways).to(support.dtype)  # [S, ways]
    return (onehot.t() @ support.flatten(1)).view(ways, *support.shape[1:])


class RelationPredictor:
    """Adapted Relation Network for one task: relation logits of each query to each class."""

    def __init__(self, backbone: nn.Module, module: RelationModule, classes: Tensor) -> None:
        self.backbone = EvalModule(backbone)
        self.module = EvalModule(module)
        self.classes = classes  # [ways, C, H, W], detached

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> logits [Q, ways]`` (``sigmoid(logits)`` are the relation scores)."""
        return self.module(self.classes, self.backbone(query_x))


def _batch_stats_call(module: nn.Module, *args: Tensor) -> Tensor:
    """``module(*args)`` with every BatchNorm on the batch's own statistics; running statistics neither read nor written."""
    # Only the running-statistics buffers are overridden (hidden); parameters are the module's own.
    return torch.func.functional_call(module, without_running_stats(module), args, strict=False)


class TransductiveRelationPredictor:
    """Relation logits with BatchNorm on the episode's own statistics, as in training.

    Each call embeds the task's support set together with the given queries
    and normalises every BatchNorm layer of both modules with that batch's
    statistics (running statistics untouched), exactly the computation of a
    training episode. A query's logits therefore depend on the other queries
    of the call (transductive); the reference code of Sung et al. tests this
    way (its modules are never put in eval mode).
    """

    transductive = True

    def __init__(self, learner: RelationNet, support_x: Tensor, support_y: Tensor, ways: int) -> None:
        self.learner = learner
        self.support_x = support_x.detach().clone()
        self.support_y = support_y.detach().clone()
        self.ways = ways

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> logits [Q, ways]``."""
        s = self.support_x.shape[0]
        z = _batch_stats_call(self.learner.backbone, torch.cat([self.support_x, query_x]))
        self.learner._check_maps(z)
        return _batch_stats_call(self.learner.relation, class_features(z[:s], self.support_y, self.ways), z[s:])


class RelationNet(Learner):
    """Relation Networks (Sung et al., "Learning to Compare: Relation Network for Few-Shot Learning", CVPR 2018).

    An embedding module maps images to feature maps; each class's feature map
    is the sum of its support maps; a learned relation module scores every
    (class, query) pair, concatenated along channels, with a sigmoid relation
    score. Trained by regressing the scores to the one-hot match (``loss="mse"``,
    the paper's eq. 3), or optionally with softmax cross-entropy over the
    pre-sigmoid relation logits (``loss="cross_entropy"``). No inner-loop
    gradients (``order = None``).

    Args:
        backbone: the embedding module, ``[N, *x_shape] -> [N, C, H, W]``
            (:class:`~metaxfer.backbones.relation_conv4.RelationConv4`, ``"relation_conv4"``, in the paper).
        feature_shape: ``(C, H, W)`` the relation module is built for; read
            from ``backbone.feature_shape`` when omitted.
        hidden: relation module conv channels (64).
        fc_hidden: relation module hidden units (8).
        padding: relation module conv padding (1 on Omniglot).
        loss: ``"mse"`` (paper) or ``"cross_entropy"``.
        transductive: predict with BatchNorm on the statistics of the support
            and query batch together, as in training (the reference code's
            test); default False: running statistics, each query independent.

    Shapes:
        ``loss(batch)``: ``support_x [T, ways*shots, *x_shape]``, ``query_x [T, ways*queries, *x_shape]``.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    BatchNorm: training normalises each task's embeddings (support and query
    together) and each task's relation pairs with their batch statistics;
    ``adapt`` and the predictor use running statistics (``eval()`` mode)
    unless ``transductive``.

    Raises:
        ConfigError: an unknown ``loss``, no known ``feature_shape``, or an
            embedding whose output shape differs from the relation module's
            input (the message names both).
        EpisodeError: a class ``0 .. ways-1`` without a support example.

    Example:
        >>> learner = RelationNet(metaxfer.backbones.create("relation_conv4", in_channels=1))
        >>> loss = learner.loss(sampler.sample_batch(1))
        >>> learner.adapt(support_x, support_y)(query_x).argmax(-1)
    """

    def __init__(self, backbone: nn.Module, feature_shape: Sequence[int] | None = None, hidden: int = 64,
                 fc_hidden: int = 8, padding: int = 1, loss: str = "mse", transductive: bool = False) -> None:
        super().__init__()
        self.transductive = bool(transductive)
        if loss not in LOSSES:
            raise ConfigError(f"unknown loss {loss!r} for the Relation Network; choose one of {list(LOSSES)}")
        if feature_shape is None:
            feature_shape = getattr(backbone, "feature_shape", None)
            if feature_shape is None:
                raise ConfigError(
                    f"the backbone {type(backbone).__name__} does not say its output feature-map shape; pass "
                    "learner_args.feature_shape=[C, H, W] (e.g. [64, 5, 5] for 28x28 Omniglot) or use the "
                    "'relation_conv4' backbone"
                )
        self.backbone = backbone
        self.relation = RelationModule(feature_shape, hidden, fc_hidden, padding)
        self.loss_name = loss
        self.last_metrics: dict[str, float] = {}

    def _check_maps(self, features: Tensor) -> None:
        got, want = tuple(features.shape[1:]), self.relation.feature_shape
        if got != want:
            raise ConfigError(
                f"the embedding outputs feature maps of shape {got} but the relation module expects {want} "
                f"(C, H, W); build the learner with feature_shape={list(got)} or feed images of the size the "
                "embedding was built for (e.g. image_size 28 gives 64x5x5 with relation_conv4)"
            )

    def task_logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, ways: int) -> Tensor:
        """Relation logits ``[Q, ways]`` of one task, differentiable (one embedding pass over support and query)."""
        s = support_x.shape[0]
        z = self.backbone(torch.cat([support_x, query_x]))
        self._check_maps(z)
        return self.relation(class_features(z[:s], support_y, ways), z[s:])

    def objective(self, logits: Tensor, query_y: Tensor) -> Tensor:
        """The training loss of relation logits ``[..., Q, ways]`` against labels ``[..., Q]``."""
        if self.loss_name == "mse":
            target = F.one_hot(query_y, logits.shape[-1]).to(logits.dtype)
            return F.mse_loss(torch.sigmoid(logits), target)
        return F.cross_entropy(logits.flatten(0, -2), query_y.flatten())

    def loss(self, batch: Episode) -> Tensor:
        """Mean query loss over the tasks of ``batch`` (``[T, ...]`` tensors)."""
        batch = batch.batch()
        ways = episode_ways(batch)
        # Tasks run one at a time so the BatchNorm statistics of both modules stay per task.
        logits = torch.stack([self.task_logits(batch.support_x[t], batch.support_y[t], batch.query_x[t], ways)
                              for t in range(batch.num_tasks)])
        with torch.no_grad():
            self.last_metrics = {"accuracy": (logits.argmax(-1) == batch.query_y).float().mean().item()}
        return self.objective(logits, batch.query_y)

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> RelationPredictor | TransductiveRelationPredictor:
        """Sum one task's support feature maps per class (no parameters change)."""
        ways = check_support_classes(support_y)
        if self.transductive:
            return TransductiveRelationPredictor(self, support_x, support_y, ways)
        z = EvalModule(self.backbone)(support_x)
        self._check_maps(z)
        return RelationPredictor(self.backbone, self.relation, class_features(z, support_y, ways))


@register_learner("relation")
def relation(backbone: nn.Module, feature_shape: Sequence[int] | None = None, hidden: int = 64, fc_hidden: int = 8,
             padding: int = 1, loss: str = "mse", transductive: bool = False) -> RelationNet:
    """Relation Network around the embedding ``backbone`` (see :class:`RelationNet`)."""
    return RelationNet(backbone, feature_shape, hidden, fc_hidden, padding, loss, transductive)

