"""The learner contract every algorithm keeps.

A learner is an ``nn.Module`` with

* ``loss(batch: Episode) -> Tensor``: the meta-training objective of a meta-batch
  whose tensors carry a leading task dimension ``[tasks, ...]``;
* ``adapt(support_x, support_y) -> Predictor``: adapts to ONE task and returns a
  new callable ``query_x -> logits``; it never mutates the learner;
* ``preprocess(images) -> Tensor``: turns PIL images into exactly the tensors the
  learner was trained on (set when the learner is built from a dataset config
  or loaded from disk).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.tasks.episode import Episode


class Predictor(Protocol):
    """An adapted model for one task: ``query_x [Q, *x_shape] -> logits [Q, ways]``."""

    def __call__(self, query_x: Tensor) -> Tensor: ...


class Learner(nn.Module):
    """Base class of few-shot learners (see module docstring for the contract).

    Class attributes each subclass sets:
        transductive: whether predictions for one query example depend on the
            other query examples (False for every learner by default). A learner
            that offers both BatchNorm policies sets ``self.transductive`` in its
            constructor; :meth:`set_transductive` switches it.
        order: ``"second"``, ``"first"`` or ``None`` (no inner-loop gradients).
    """

    transductive: bool = False
    order: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self.preprocessor: Callable[[Sequence[Any]], Tensor] | None = None

    def loss(self, batch: Episode) -> Tensor:
        """Meta-training loss of a batched episode (scalar, mean over tasks)."""
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Predictor:
        """Adapt to one task's support set ``[S, *x_shape]``, ``[S]``; return a predictor."""
        raise NotImplementedError

    def set_transductive(self, transductive: bool = True) -> None:
        """Choose whether predictions normalise the queries with their own BatchNorm batch statistics.

        The papers' "transduction" protocol (the MAML and Reptile reference
        code, Relation Networks' test code): a query's prediction then depends
        on the other queries of the call. Off by default.

        Raises:
            ConfigError: the learner has no such choice (its predictions never
                use the query batch's statistics).
        """
        if "transductive" not in vars(self):
            raise ConfigError(
                f"{type(self).__name__} has no transductive mode: its predictions never depend on the other queries; "
                "transductive evaluation applies to MAML, FO-MAML, ANIL, Meta-SGD, Reptile, the LSTM meta-learner and "
                "Relation Networks"
            )
        self.transductive = bool(transductive)

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        """Convert PIL images to the input tensors ``[N, C, H, W]`` this learner was trained on.

        Raises:
            RuntimeError: when the learner carries no preprocessing (it was built
                from a bare module rather than from a config or checkpoint).
        """
        if self.preprocessor is None:
            raise RuntimeError(
                "this learner carries no preprocessing: build it with metaxfer.build_learner(config) or load it "
                "with metaxfer.load(...), or set learner.preprocessor to a callable list[PIL.Image] -> Tensor"
            )
        return self.preprocessor(images)
