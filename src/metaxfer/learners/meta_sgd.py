"""Meta-SGD (Li et al. 2017): MAML with meta-learned per-parameter inner learning rates."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metaxfer.errors import ConfigError
from metaxfer.functional.inner_loop import LearningRate
from metaxfer.learners.gradient import MAML, loss_by_name
from metaxfer.learners.registry import register_learner

__all__ = ["MetaSGD", "meta_sgd"]


class MetaSGD(MAML):
    """Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

    https://arxiv.org/abs/1707.09835. Like MAML, but the inner update is
    ``theta' = theta - alpha * grad`` (elementwise) where ``alpha`` has the shape
    of ``theta`` and is meta-learned together with it: each coordinate gets its
    own learning rate, and since ``alpha`` may turn negative it also learns the
    update direction. Everything else (the shared functional inner loop, the
    BatchNorm policy, vmap over tasks, first/second order, ``adapt``) is
    :class:`MAML`'s.

    Args:
        model: maps ``[N, *x_shape]`` to ``[N, ways]`` logits.
        inner_lr: initial value of every ``alpha`` entry (when ``alpha_init_range`` is None).
        alpha_init_range: ``(low, high)``: draw the initial ``alpha`` uniformly
            from this range instead (the paper draws from ``[0.005, 0.1]``);
            uses the global torch RNG, like module initialisation.
        **kwargs: the other :class:`MAML` arguments (``inner_steps``,
            ``first_order``, ``eval_inner_steps``, ``adapt``, ...).

    Raises:
        ConfigError: ``adapt`` names a parameter that needs no gradient
            (no rate can be learned for it), or a bad ``alpha_init_range``.

    Shapes:
        as :class:`MAML`; ``alphas[i]`` has the shape of the ``i``-th adapted
        parameter (``adapted_names[i]``).

    Example:
        >>> from metaxfer.backbones import Conv4
        >>> learner = MetaSGD(Conv4(num_classes=5, norm="batchnorm_split"), inner_lr=0.4)
        >>> [tuple(a.shape) for a in learner.alphas][-1]
        (5,)
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        alpha_init_range: Sequence[float] | None = None,
        **kwargs: object,
    ) -> None:
        if kwargs.get("learn_inner_lr"):
            raise ConfigError("Meta-SGD already learns its inner learning rates; drop learn_inner_lr")
        super().__init__(model, inner_lr=inner_lr, **kwargs)  # type: ignore[arg-type]
        params = dict(self.model.named_parameters())
        if alpha_init_range is not None:
            low, high = (float(v) for v in alpha_init_range)
            if not low < high:
                raise ConfigError(f"alpha_init_range must be (low, high) with low < high, got {tuple(alpha_init_range)}")
            init = [torch.empty_like(params[n]).uniform_(low, high) for n in self.adapted_names]
        else:
            init = [torch.full_like(params[n], self.inner_lr) for n in self.adapted_names]
        self.alphas = nn.ParameterList([nn.Parameter(a.detach()) for a in init])

    def _inner_lr(self, detach: bool) -> LearningRate:
        return {name: (a.detach() if detach else a) for name, a in zip(self.adapted_names, self.alphas)}


@register_learner("meta_sgd")
def meta_sgd(backbone: nn.Module, loss: str = "cross_entropy", **kwargs: object) -> MetaSGD:
    """Meta-SGD around ``backbone``, a model mapping inputs to logits (see :class:`MetaSGD`)."""
    return MetaSGD(backbone, loss_fn=loss_by_name(loss), **kwargs)  # type: ignore[arg-type]
