"""ANIL (Raghu et al. 2020): MAML whose inner loop adapts only the head; features computed once per task."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.functional.inner_loop import (
    InnerLoopResult,
    LearningRate,
    Params,
    inner_loop,
    support_then_query,
    without_running_stats,
)
from metaxfer.learners.gradient import MAML, AdaptedPredictor, _forward, loss_by_name
from metaxfer.learners.registry import register_learner

__all__ = ["ANIL", "BodyHead", "anil"]


class BodyHead(nn.Module):
    """``head(body(x))``: a feature extractor and a classifier kept as two named submodules.

    Args:
        body: ``[N, *x_shape] -> [N, D]`` features.
        head: ``[N, D] -> [N, ways]`` logits.
    """

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _sub(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix.``, with the prefix removed (for a submodule's functional_call)."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


class ANIL(MAML):
    """Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

    "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness
    of MAML", https://arxiv.org/abs/1909.09157. The body (feature extractor)
    is meta-learned by the outer loop only; the inner loop adapts the linear
    head alone. Because the body does not change during adaptation, each
    task's support and query features are computed ONCE (one body pass over
    ``cat([support, query])`` with support BatchNorm statistics, as in
    :class:`MAML`'s non-transductive policy), and the inner loop, first or
    second order, runs on the head over those features: the cost of an inner
    step no longer depends on the body's size.

    Args:
        body: ``[N, *x_shape] -> [N, D]`` features (e.g. ``Conv4()`` without ``num_classes``).
        head: ``[N, D] -> [N, ways]``, e.g. ``nn.Linear(D, ways)``.
        **kwargs: the other :class:`MAML` arguments (``inner_lr``, ``inner_steps``,
            ``first_order``, ``eval_inner_steps``, ``vectorize``, ``transductive``...);
            ``adapt`` is fixed to the head.

    Shapes:
        as :class:`MAML`. The learner's module is ``self.model = BodyHead(body, head)``.

    Example:
        >>> from metaxfer.backbones import Conv4
        >>> learner = ANIL(Conv4(norm="batchnorm_split"), nn.Linear(64, 5), inner_lr=0.1, inner_steps=5)
        >>> learner.adapted_names
        ['head.weight', 'head.bias']
    """

    def __init__(self, body: nn.Module, head: nn.Module, **kwargs: object) -> None:
        if "adapt" in kwargs:
            raise ConfigError("ANIL always adapts the head only; drop the adapt argument (or use MAML(adapt=...))")
        super().__init__(BodyHead(body, head), adapt=["head"], **kwargs)  # type: ignore[arg-type]

    def _features(self, fixed: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        """Body features ``[S + Q, D]`` of one task under the BatchNorm policy."""
        body = _sub(fixed, "body")
        if self.transductive:
            return torch.cat([_forward(self.model.body, body, support_x, None), _forward(self.model.body, body, query_x, None)])

        def call(x: Tensor) -> Tensor:
            return torch.func.functional_call(self.model.body, (body, without_running_stats(self.model.body)), (x,), strict=False)

        return torch.cat(support_then_query(call, support_x, query_x))

    def _adapt_head(
        self, params: Params, fixed: Params, support_f: Tensor, support_y: Tensor, steps: int, lr: LearningRate | list[LearningRate]
    ) -> InnerLoopResult:
        """The shared inner loop on the head only, over fixed support features ``[S, D]``."""
        head_fixed = _sub(fixed, "head")

        def support_loss(p: Params, f: Tensor, y: Tensor) -> Tensor:
            return self.loss_fn(torch.func.functional_call(self.model.head, {**head_fixed, **_sub(p, "head")}, (f,)), y)

        return inner_loop(  # type: ignore[return-value]
            support_loss, params, support_f, support_y, lr, steps, self.first_order,
            grad_clip=self.inner_grad_clip, return_losses=True,
        )

    def _task_loss(
        self,
        params: Params,
        fixed: Params,
        lr: LearningRate | list[LearningRate],
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        s = support_x.shape[0]
        feats = self._features(fixed, support_x, query_x)
        adapted, inner_losses = self._adapt_head(params, fixed, feats[:s], support_y, self.inner_steps, lr)
        out = torch.func.functional_call(self.model.head, {**_sub(fixed, "head"), **_sub(adapted, "head")}, (feats[s:],))
        return self.loss_fn(out, query_y), out.detach(), inner_losses

    def adapt(self, support_x: Tensor, support_y: Tensor) -> AdaptedPredictor:
        """Adapt the head to one task (``eval_inner_steps`` steps on cached features); never mutates the learner.

        Raises:
            NonFiniteLossError: the support loss became NaN/inf (names the step).
        """
        params, fixed = self._split_params(detach=True)
        with torch.no_grad():
            body = _sub(fixed, "body")
            support_f = _forward(self.model.body, body, support_x, None)
        adapted, inner = self._adapt_head(params, fixed, support_f, support_y, self.eval_inner_steps, self._inner_lr(detach=True))
        self._raise_on_nonfinite(inner.unsqueeze(0))
        state = {name: t.detach().clone() for name, t in {**fixed, **adapted}.items()}
        return AdaptedPredictor(self.model, state, None if self.transductive else support_x.detach().clone())


def _feature_dim(body: nn.Module, feature_dim: int | None) -> int:
    if feature_dim is not None:
        return int(feature_dim)
    dim = getattr(body, "out_features", None)
    if not isinstance(dim, int):
        raise ConfigError(
            f"cannot tell the feature size of backbone {type(body).__name__}: give learner_args.feature_dim "
            "(the D of its [N, D] output)"
        )
    return dim


@register_learner("anil")
def anil(backbone: nn.Module, ways: int = 5, feature_dim: int | None = None, loss: str = "cross_entropy",
         **kwargs: object) -> ANIL:
    """ANIL with ``backbone`` as the body (``[N, *x] -> [N, D]`` features) and a new ``Linear(D, ways)`` head."""
    if ways < 2:
        raise ConfigError(f"ways must be >= 2 for a classification head, got {ways}")
    head = nn.Linear(_feature_dim(backbone, feature_dim), ways)
    return ANIL(backbone, head, loss_fn=loss_by_name(loss), **kwargs)


