"""The LSTM meta-learner (Ravi & Larochelle 2017): a learned optimiser whose cell state is the learner's weights.

The learned update is an ``update`` rule of the library's one functional
inner loop (:func:`metaxfer.functional.inner_loop`), so adaptation runs per
task or vectorised over the tasks of a meta-batch with ``torch.func.vmap``,
exactly like MAML's and Reptile's.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.functional.inner_loop import Params, inner_loop
from metaxfer.functional.update_rules import flatten_params, log_sign_preprocess, unflatten_params
from metaxfer.learners._tasks import (
    check_steps,
    classification_metrics,
    map_tasks,
    query_outputs,
    split_params,
    stack_results,
)
from metaxfer.learners.base import Learner
from metaxfer.learners.gradient import (
    AdaptedPredictor,
    LossFn,
    loss_by_name,
    support_loss_of,
)
from metaxfer.learners.registry import register_learner
from metaxfer.tasks.episode import Episode

__all__ = ["LSTMMetaLearner", "MetaLSTMState", "MetaLSTMUpdate", "lstm_meta"]


class MetaLSTMState(NamedTuple):
    """What the learned update carries between inner steps (``n`` = number of learner parameters).

    Attributes:
        h: ``[n, hidden]`` hidden state of the first (ordinary) LSTM layer.
        cell: ``[n, hidden]`` its cell state.
        forget: ``[n]`` previous forget gate ``f_{t-1}``.
        input: ``[n]`` previous input gate ``i_{t-1}``.
    """

    h: Tensor
    cell: Tensor
    forget: Tensor
    input: Tensor


class MetaLSTMUpdate(nn.Module):
    """The coordinate-wise two-layer LSTM of Ravi & Larochelle (2017) as an inner-loop update rule.

    Every learner parameter ``theta_j`` is one coordinate; all coordinates
    share the same weights, so the number of meta-parameters does not depend
    on the learner's size (section 3.2, "parameter sharing"). At inner step
    ``t``, with the learner's gradient ``g_t [n]`` and loss ``L_t`` (both
    detached: the paper drops their second derivatives, section 3.2):

    1. ``x_t = [pre(g_t), pre(L_t)]`` ``[n, 4]`` with the preprocessing
       ``pre`` of Andrychowicz et al. 2016 (:func:`log_sign_preprocess`);
    2. ``h_t = LSTM(x_t, h_{t-1})`` ``[n, hidden]``, an ordinary LSTM layer;
    3. gates (eq. 2 and 3), fed with the first layer's output, the current
       weights and the previous gate:
       ``i_t = sigmoid(W_I [h_t, theta_{t-1}, i_{t-1}] + b_I)`` (a learned,
       per-coordinate learning rate) and
       ``f_t = sigmoid(W_F [h_t, theta_{t-1}, f_{t-1}] + b_F)`` (learned
       shrinking of the weights);
    4. the cell update IS the learner's update (eq. 2):
       ``theta_t = c_t = f_t * c_{t-1} - i_t * g_t``.

    Initialisation as in the paper (section 3.2 and the authors' code):
    ``b_F ~ U(4, 6)`` so that ``f ~ 1`` (no shrinking) and ``b_I ~ U(-5, -4)``
    so that ``i ~ 0.01`` (a small learning rate); ``W_F, W_I ~ U(-0.01, 0.01)``.

    Args:
        hidden: units of the first LSTM layer (paper: 20).
        p: preprocessing scale (paper: 10).
        forget_bias: range of the initial forget-gate bias.
        input_bias: range of the initial input-gate bias.

    Shapes:
        ``forward(params, grads, loss, step, state)``: ``params`` and ``grads``
        are dicts of tensors (any shapes, ``n`` numbers in all), ``loss`` a
        scalar; returns the new params (same keys and shapes) and a
        :class:`MetaLSTMState`.

    Example:
        >>> rule = MetaLSTMUpdate()
        >>> params, state = rule({"w": torch.ones(3)}, {"w": torch.ones(3)}, torch.tensor(1.0), 0, None)
        >>> params["w"].shape, state.h.shape
        (torch.Size([3]), torch.Size([3, 20]))
    """

    def __init__(
        self,
        hidden: int = 20,
        p: float = 10.0,
        forget_bias: tuple[float, float] = (4.0, 6.0),
        input_bias: tuple[float, float] = (-5.0, -4.0),
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ConfigError(f"hidden must be a positive number of LSTM units, got {hidden}")
        if p <= 0:
            raise ConfigError(f"the preprocessing scale p must be positive, got {p}")
        self.hidden, self.p = int(hidden), float(p)
        # First layer: an ordinary LSTM over the 4 preprocessed inputs (PyTorch's LSTMCell layout and
        # initialisation), written out below so that it is plain tensor maths under vmap.
        bound = 1 / math.sqrt(hidden)
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden, 4).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden, hidden).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(4 * hidden).uniform_(-bound, bound))
        # Second layer: the two gates of the meta-learner cell, inputs [h_t, theta_{t-1}, gate_{t-1}].
        self.w_forget = nn.Parameter(torch.empty(hidden + 2).uniform_(-0.01, 0.01))
        self.w_input = nn.Parameter(torch.empty(hidden + 2).uniform_(-0.01, 0.01))
        self.b_forget = nn.Parameter(torch.empty(()).uniform_(*forget_bias))
        self.b_input = nn.Parameter(torch.empty(()).uniform_(*input_bias))

    def _lstm(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One coordinate-wise LSTM step: ``x [n, 4]``, ``h, c [n, hidden]`` -> new ``(h, c)``."""
        gates = x @ self.weight_ih.T + h @ self.weight_hh.T + self.bias
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def gates(self, h: Tensor, theta: Tensor, state: MetaLSTMState) -> tuple[Tensor, Tensor]:
        """Forget and input gates ``[n]`` from ``h [n, hidden]``, weights ``theta [n]`` and previous gates."""
        f = torch.sigmoid(torch.cat([h, theta[:, None], state.forget[:, None]], -1) @ self.w_forget + self.b_forget)
        i = torch.sigmoid(torch.cat([h, theta[:, None], state.input[:, None]], -1) @ self.w_input + self.b_input)
        return f, i

    def forward(self, params: Params, grads: Params, loss: Tensor, step: int, state: Any) -> tuple[Params, MetaLSTMState]:
        """One learned update of ``params`` (see the class docstring)."""
        names = list(params)
        theta = flatten_params(params, names)
        # Detached: the paper ignores the second derivatives through the learner's gradient and loss.
        grad = flatten_params(grads, names).detach()
        n = theta.shape[0]
        if state is None:
            zeros = theta.new_zeros(n, self.hidden)
            state = MetaLSTMState(zeros, zeros, theta.new_zeros(n), theta.new_zeros(n))
        x = torch.cat([log_sign_preprocess(grad, self.p),
                       log_sign_preprocess(loss.detach(), self.p).expand(n, 2)], -1)
        h, cell = self._lstm(x, state.h, state.cell)
        f, i = self.gates(h, theta, state)
        theta = f * theta - i * grad
        return unflatten_params(theta, params, names), MetaLSTMState(h, cell, f, i)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, p={self.p}"


class LSTMMetaLearner(Learner):
    """LSTM meta-learner (Ravi & Larochelle, ICLR 2017), first-order and non-transductive.

    "Optimization as a Model for Few-Shot Learning",
    https://openreview.net/forum?id=rJY0-Kcll. A learned optimiser
    (:class:`MetaLSTMUpdate`) trains the learner ``model`` on a task's support
    set for ``inner_steps`` steps; its cell state is the learner's flattened
    parameters, whose initial value ``c_0`` (the learner's initialisation,
    here simply ``model``'s parameters) is meta-learned together with the
    LSTM. The meta-loss is the query loss of the learner after the last step
    (algorithm 1), averaged over the tasks of a meta-batch; it is
    backpropagated through the learned updates to the LSTM weights and to
    ``c_0``, treating the learner's gradients and losses as constants (the
    paper's first-order simplification, section 3.2).

    All parameters of ``model`` with ``requires_grad=True`` are coordinates
    of the cell state; frozen ones are used as they are.

    BatchNorm: the paper uses batch statistics at training and test time
    (section 3.3), which at test time means normalising the queries with the
    query batch (transductive). This class follows the library's policy
    instead (see :class:`~metaxfer.learners.gradient.MAML`): batch statistics
    of the support set in the inner loop, and queries normalised with the
    support statistics, non-transductive; ``transductive=True`` gives the
    paper's query-batch statistics.

    Memory: the LSTM runs on every coordinate, so one inner step costs
    ``O(n * hidden)`` activations kept for the backward pass (``n`` =
    learner parameters); the paper's small Conv4 (32 filters) keeps ``n``
    near 30k.

    Args:
        model: the learner, mapping ``[N, *x_shape]`` to ``[N, ways]`` logits.
        inner_steps: learned updates per task in meta-training.
        eval_inner_steps: updates in :meth:`adapt`; defaults to
            ``inner_steps`` (the LSTM was trained for that many).
        hidden: units of the meta-learner's first LSTM layer (paper: 20).
        p: gradient / loss preprocessing scale (paper: 10).
        forget_bias, input_bias: ranges of the initial gate biases.
        vectorize: adapt the tasks of a meta-batch with ``torch.func.vmap``;
            ``False`` loops over tasks (same result).
        task_chunk: with ``vectorize``, vmap over at most this many tasks at a time.
        transductive: normalise queries with query batch statistics.
        loss_fn: ``(outputs, targets) -> scalar`` inner and outer loss.

    Shapes:
        ``loss(batch)``: ``support_x [T, S, *x_shape]``, ``support_y [T, S]``,
        ``query_x [T, Q, *x_shape]``, ``query_y [T, Q]``; returns a scalar.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns a predictor
        ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    Attributes:
        meta_optimizer: the :class:`MetaLSTMUpdate`.
        last_metrics: ``{"accuracy": float}`` query accuracy after adaptation
            in the last :meth:`loss` call.

    Example:
        >>> from metaxfer.backbones import Conv4
        >>> learner = LSTMMetaLearner(Conv4(num_classes=5, hidden=8), inner_steps=5)
        >>> batch = Episode(torch.randn(2, 25, 1, 28, 28), torch.arange(5).repeat_interleave(5).repeat(2, 1),
        ...                 torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> learner.loss(batch).backward()
        >>> learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]).shape
        torch.Size([10, 5])
    """

    order = "first"

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 8,
        eval_inner_steps: int | None = None,
        hidden: int = 20,
        p: float = 10.0,
        forget_bias: tuple[float, float] = (4.0, 6.0),
        input_bias: tuple[float, float] = (-5.0, -4.0),
        vectorize: bool = True,
        task_chunk: int | None = None,
        transductive: bool = False,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        super().__init__()
        check_steps(inner_steps, eval_inner_steps, task_chunk)
        self.model = model
        self.meta_optimizer = MetaLSTMUpdate(hidden, p, tuple(forget_bias), tuple(input_bias))  # type: ignore[arg-type]
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.vectorize = bool(vectorize)
        self.task_chunk = task_chunk
        self.transductive = bool(transductive)
        self.loss_fn = loss_fn
        self.last_metrics: dict[str, float] = {}

    def _adapt_params(self, params: Params, frozen: Params, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """``steps`` learned updates from ``params`` (= ``c_0``) on one task's support set."""

        return inner_loop(support_loss_of(self.model, self.loss_fn, frozen), params, support_x, support_y, None, steps, first_order=True,  # type: ignore[return-value]
                          update=self.meta_optimizer)

    def _task_loss(
        self, params: Params, frozen: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One task: (query loss after adaptation, detached query outputs ``[Q, ...]``)."""
        adapted = self._adapt_params(params, frozen, support_x, support_y, self.inner_steps)
        out = query_outputs(self.model, {**frozen, **adapted}, support_x, query_x, self.transductive)
        return self.loss_fn(out, query_y), out.detach()

    def loss(self, batch: Episode) -> Tensor:
        """Mean query loss after the learned updates over the ``T`` tasks of ``batch`` (Ravi & Larochelle, alg. 1).

        Args:
            batch: an episode with ``[T, ...]`` tensors (an unbatched one counts as ``T = 1``).

        Returns:
            Scalar meta-loss, differentiable w.r.t. the meta-learner's weights
            and the learner's initialisation ``c_0``. Sets ``self.last_metrics``.
        """
        batch = batch.batch()
        params, frozen = split_params(self.model, detach=False)
        parts = map_tasks(self._task_loss, (params, frozen), batch, self.vectorize, self.task_chunk)
        losses, outputs = stack_results(parts, self.vectorize)
        self.last_metrics = classification_metrics(outputs, batch.query_y)
        return losses.mean()

    def adapt(self, support_x: Tensor, support_y: Tensor) -> AdaptedPredictor:
        """Train the learner on one support set with ``eval_inner_steps`` learned updates; never mutates ``self``.

        Args:
            support_x: ``[S, *x_shape]`` support inputs.
            support_y: ``[S]`` support labels (``0 .. ways-1``) or targets.

        Returns:
            An :class:`~metaxfer.learners.gradient.AdaptedPredictor`
            ``query_x [Q, *x_shape] -> logits [Q, ways]`` with its own copy of the adapted weights.
        """
        params, frozen = split_params(self.model, detach=True)
        with torch.no_grad():  # no graph to the LSTM's weights is needed for prediction
            adapted = self._adapt_params(params, frozen, support_x, support_y, self.eval_inner_steps)
        state = {name: t.detach().clone() for name, t in {**frozen, **adapted}.items()}
        return AdaptedPredictor(self.model, state, None if self.transductive else support_x.detach().clone())

    def extra_repr(self) -> str:
        return (
            f"inner_steps={self.inner_steps}, eval_inner_steps={self.eval_inner_steps}, vectorize={self.vectorize}, "
            f"task_chunk={self.task_chunk}, transductive={self.transductive}"
        )


@register_learner("lstm_meta")
def lstm_meta(backbone: nn.Module, loss: str = "cross_entropy", **kwargs: object) -> LSTMMetaLearner:
    """LSTM meta-learner around ``backbone`` (the learner; see :class:`LSTMMetaLearner` for ``kwargs``).

    ``loss`` names the inner and outer loss (``"cross_entropy"`` or ``"mse"``).
    """
    return LSTMMetaLearner(backbone, loss_fn=loss_by_name(loss), **kwargs)  # type: ignore[arg-type]
