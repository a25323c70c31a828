"""Reptile (Nichol, Achiam & Schulman 2018): first-order meta-learning by interpolating toward adapted weights.

The inner loop is the library's one functional loop
(:func:`metaxfer.functional.inner_loop`), run per task or vectorised over the
tasks of a meta-batch with ``torch.func.vmap``; the optional inner Adam is an
``update`` rule (:class:`metaxfer.functional.update_rules.AdamUpdate`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.functional.inner_loop import Params, UpdateRule, inner_loop
from metaxfer.functional.update_rules import AdamUpdate
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
    check_output_ways,
    loss_by_name,
    support_loss_of,
)
from metaxfer.learners.registry import register_learner
from metaxfer.tasks.episode import Episode

__all__ = ["Reptile", "reptile"]

INNER_OPTIMIZERS = ("sgd", "adam")
INNER_DATA = ("support", "support+query")


class Reptile(Learner):
    """Reptile (Nichol, Achiam & Schulman 2018), a first-order, non-transductive meta-learner.

    "On First-Order Meta-Learning Algorithms", https://arxiv.org/abs/1803.02999,
    algorithm 2 (batched; ``tasks_per_step = 1`` is the serial algorithm 1).
    For each task ``t`` of a meta-batch, ``inner_steps`` optimiser steps on
    the task's data from ``theta`` give adapted weights ``phi_t``; the outer
    step moves the initialisation toward them:

        ``theta <- theta + eps * (mean_t(phi_t) - theta)``.

    No query loss and no second derivative enter the outer step.

    How the outer step is expressed (so that :func:`metaxfer.fit` and any
    torch optimiser work unchanged): :meth:`loss` returns the surrogate

        ``L(theta) = 0.5 * sum_params || theta - stopgrad(mean_t phi_t) ||^2``

    whose gradient w.r.t. ``theta`` is exactly ``theta - mean_t phi_t``, so
    ``torch.optim.SGD(lr=eps)`` *without momentum* performs the interpolation
    above exactly (the paper's outer step, with ``eps`` = its "outer step
    size"; a linearly annealed ``eps`` is an LR schedule). Any other
    optimiser (e.g. Adam) treats ``theta - phi`` as a gradient, which the
    paper mentions as an option (section 3). The surrogate's value, half the
    squared length of the Reptile step, is what the trainer logs as "loss".

    Inner loop (choices, and why):
        * Data: ``inner_data="support"`` (default) adapts on the support set
          only, so the query set is held out and ``last_metrics["accuracy"]``
          is an honest post-adaptation accuracy. The paper samples
          ``train_shots`` examples per class and uses them all in the inner
          loop; with ``"support"`` set the training episodes' ``shots`` to
          that number (the Omniglot preset trains with 10 shots and 5
          queries, tests with 1 shot). ``"support+query"`` uses the union
          of support and query as inner data at training time (every
          example of the episode is inner-loop data, as in the paper; the
          reported query accuracy is then an in-sample fit accuracy).
          :meth:`adapt` always uses the support set only.
        * Optimiser: ``inner_optimizer="adam"`` is Adam with ``betas =
          (0, 0.999)`` as in the paper (appendix A, "Adam with beta1 = 0");
          ``"sgd"`` is plain gradient descent. By default Adam's moments are
          reset for every task, so its first step moves every weight by
          ``inner_lr`` whatever its gradient's size (sign descent).
          ``persistent_inner_state=True`` keeps them across tasks as the
          reference code does (TensorFlow's Adam slots are never reset):
          every task of a meta-batch starts from the learner's stored
          moments and step count (buffers, saved in checkpoints), which then
          become the mean of the tasks' final moments (the tasks of a
          vmapped batch run side by side, where the reference chains them
          one after another) and ``t + inner_steps``; :meth:`adapt` starts
          from them without changing them (the reference restores its
          state after each evaluation task). Under ``torch.distributed``
          the moments are averaged over every process's tasks (one collective).
        * Minibatches: by default each inner step uses all of the task's
          inner data. ``inner_batch_size=b`` makes each meta-training inner
          step use the next ``b`` examples of the task's support set,
          shuffled afresh for every task and step of training, as in the
          paper (Omniglot: 5 steps of 10 over 50 examples, one epoch, a
          fifth of the full-batch cost). BatchNorm then uses the
          minibatch's statistics. :meth:`adapt` always uses the whole
          support set (the paper's evaluation batch for 5-way 1-shot is
          the 5 support images).
        * Inner gradients are never differentiated (first order): the adapted
          weights are computed without an outer graph, which keeps the
          memory of a step independent of ``inner_steps``.

    BatchNorm policy: MAML's (see :class:`metaxfer.learners.gradient.MAML`):
    the inner loop uses batch statistics of the inner data, queries are
    normalised with the support statistics (non-transductive), running
    statistics are never read or written. ``transductive=True`` normalises
    queries with their own batch statistics (the paper's "transduction"
    rows in tables 1 and 2).

    Args:
        model: maps ``[N, *x_shape]`` to ``[N, ways]`` logits, e.g.
            ``Conv4(num_classes=5)``.
        inner_lr: inner step size (paper, Omniglot: Adam with 1e-3).
        inner_steps: inner steps per task in meta-training (paper: 5).
        eval_inner_steps: inner steps in :meth:`adapt` (paper: 50); defaults
            to ``inner_steps``.
        inner_optimizer: ``"adam"`` or ``"sgd"``.
        adam_betas: ``(beta1, beta2)`` of the inner Adam.
        inner_data: ``"support"`` or ``"support+query"`` (see above).
        inner_batch_size: examples per meta-training inner step (``None``:
            the whole support set); only with ``inner_data="support"``.
        persistent_inner_state: keep the inner Adam's moments across tasks
            (see above); only with ``inner_optimizer="adam"``.
        vectorize: adapt the tasks of a meta-batch together with
            ``torch.func.vmap``; ``False`` loops over tasks (same result).
        task_chunk: with ``vectorize``, vmap over at most this many tasks at a
            time (bounds memory).
        transductive: normalise queries with query batch statistics.
        loss_fn: ``(outputs, targets) -> scalar`` inner loss (cross-entropy;
            MSE for regression).

    Shapes:
        ``loss(batch)``: ``support_x [T, S, *x_shape]``, ``support_y [T, S]``,
        ``query_x [T, Q, *x_shape]``, ``query_y [T, Q]``; returns a scalar.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns a predictor
        ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    Attributes:
        last_metrics: ``{"accuracy": float}``: query accuracy after adaptation
            in the last :meth:`loss` call (classification only).

    Example:
        >>> from metaxfer.backbones import Conv4
        >>> learner = Reptile(Conv4(num_classes=5, hidden=8), inner_lr=1e-3, inner_steps=5, eval_inner_steps=50)
        >>> outer = torch.optim.SGD(learner.parameters(), lr=1.0)  # eps = 1: theta <- mean phi
        >>> batch = Episode(torch.randn(5, 50, 1, 28, 28), torch.arange(5).repeat_interleave(10).repeat(5, 1),
        ...                 torch.randn(5, 25, 1, 28, 28), torch.arange(5).repeat_interleave(5).repeat(5, 1))
        >>> learner.loss(batch).backward(); outer.step()
        >>> learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]).shape
        torch.Size([25, 5])
    """

    order = "first"

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 1e-3,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        inner_optimizer: str = "adam",
        adam_betas: Sequence[float] = (0.0, 0.999),
        inner_data: str = "support",
        inner_batch_size: int | None = None,
        persistent_inner_state: bool = False,
        vectorize: bool = True,
        task_chunk: int | None = None,
        transductive: bool = False,
        loss_fn: LossFn = F.cross_entropy,
    ) -> None:
        super().__init__()
        check_steps(inner_steps, eval_inner_steps, task_chunk)
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if inner_data not in INNER_DATA:
            raise ConfigError(f"inner_data must be one of {INNER_DATA}, got {inner_data!r}")
        bad_batch = isinstance(inner_batch_size, bool) or not isinstance(inner_batch_size, int) or inner_batch_size <= 0
        if inner_batch_size is not None and bad_batch:
            raise ConfigError(f"inner_batch_size must be a positive integer or None, got {inner_batch_size!r}")
        if inner_batch_size is not None and inner_data != "support":
            raise ConfigError(
                "inner_batch_size draws minibatches from the support set only; "
                f"use inner_data='support' (got {inner_data!r}) or drop inner_batch_size"
            )
        if persistent_inner_state and inner_optimizer != "adam":
            raise ConfigError(
                "persistent_inner_state keeps the inner Adam's moments across tasks; "
                f"use inner_optimizer='adam' (got {inner_optimizer!r}) or drop persistent_inner_state"
            )
        if inner_lr <= 0:
            raise ConfigError(f"inner_lr must be positive, got {inner_lr}")
        if len(adam_betas) != 2:
            raise ConfigError(f"adam_betas must be two numbers (beta1, beta2), got {list(adam_betas)}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.inner_optimizer = inner_optimizer
        self.adam_betas = (float(adam_betas[0]), float(adam_betas[1]))
        # Built once: validates the betas at construction rather than at the first step.
        self._update: UpdateRule | None = (
            AdamUpdate(self.inner_lr, self.adam_betas) if inner_optimizer == "adam" else None
        )
        self.inner_data = inner_data
        self.inner_batch_size = inner_batch_size
        self.inner_state = _AdamMoments(model) if persistent_inner_state else None
        self.vectorize = bool(vectorize)
        self.task_chunk = task_chunk
        self.transductive = bool(transductive)
        self.loss_fn = loss_fn
        self.last_metrics: dict[str, float] = {}
        self._checked_ways: set[int] = set()

    @property
    def persistent_inner_state(self) -> bool:
        """Whether the inner Adam's moments are kept across tasks (see the class docstring)."""
        return self.inner_state is not None

    # -- inner loop ----------------------------------------------------------------------------

    def _adapt_params(
        self, params: Params, frozen: Params, x: Tensor, y: Tensor, steps: int, batch_size: int | None = None,
        state: dict | None = None,
    ) -> tuple[Params, dict | None]:
        """``steps`` inner steps on ``(x [N, *x_shape], y [N])`` (minibatches of ``batch_size``) from the inner
        optimiser ``state``; the adapted params and the optimiser's final state."""
        lr = None if self._update is not None else self.inner_lr
        return inner_loop(  # type: ignore[return-value]
            support_loss_of(self.model, self.loss_fn, frozen), params, x, y, lr, steps,
            first_order=True, update=self._update, batch_size=batch_size, update_state=state, return_state=True,
        )

    def _task(
        self, params: Params, frozen: Params, state: dict | None,
        support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
    ) -> tuple[Params, Tensor, dict]:
        """One task: (adapted params ``phi``, query outputs ``[Q, ...]`` after adaptation, the inner Adam's final
        moments when they persist, else ``{}``)."""
        x, y = support_x, support_y
        if self.inner_data == "support+query":
            x, y = torch.cat([support_x, query_x]), torch.cat([support_y, query_y])
        phi, final = self._adapt_params(params, frozen, x, y, self.inner_steps, self.inner_batch_size, state)
        outputs = query_outputs(self.model, {**frozen, **phi}, support_x, query_x, self.transductive)
        if self.inner_state is None:
            return phi, outputs, {}
        return phi, outputs, {"m": final["m"], "v": final["v"]}  # the step count is the same for every task

    # -- the learner contract ------------------------------------------------------------------

    def loss(self, batch: Episode) -> Tensor:
        """Reptile surrogate ``0.5 * sum ||theta - stopgrad(mean_t phi_t)||^2`` of a meta-batch.

        Its gradient is ``theta - mean_t phi_t``, so one step of plain SGD with
        learning rate ``eps`` is the Reptile update
        ``theta + eps * (mean_t phi_t - theta)`` (Nichol et al. 2018, algorithm 2).

        Args:
            batch: an episode with ``[T, ...]`` tensors (an unbatched one counts as ``T = 1``).

        Returns:
            Scalar surrogate, differentiable w.r.t. the adapted (``requires_grad``)
            parameters only. Sets ``self.last_metrics``.
        """
        batch = batch.batch()
        if self.inner_batch_size is not None:
            batch = _shuffle_support(batch)
        live, _ = split_params(self.model, detach=False)
        params, frozen = split_params(self.model, detach=True)
        check_output_ways(self.model, {**frozen, **params}, batch.support_x[0], batch.support_y[0], self._checked_ways)
        # No outer graph: phi is a constant target (first order), so the inner loop needs no
        # autograd tape beyond torch.func.grad's own, and its memory does not grow with the tasks.
        state = None if self.inner_state is None else self.inner_state.get()
        with torch.no_grad():
            parts = map_tasks(self._task, (params, frozen, state), batch, self.vectorize, self.task_chunk)
            phis, outputs, finals = stack_results(parts, self.vectorize)
            target = {name: phi.mean(0) for name, phi in phis.items()}
            if self.inner_state is not None:
                self.inner_state.set({k: {n: x.mean(0) for n, x in finals[k].items()} for k in ("m", "v")},
                                     steps=self.inner_steps, tasks=batch.num_tasks)
        self.last_metrics = classification_metrics(outputs, batch.query_y)
        return 0.5 * sum(((live[name] - target[name]) ** 2).sum() for name in live)  # type: ignore[return-value]

    def adapt(self, support_x: Tensor, support_y: Tensor) -> AdaptedPredictor:
        """Adapt to one task with ``eval_inner_steps`` inner steps on its support set; never mutates the learner.

        Args:
            support_x: ``[S, *x_shape]`` support inputs.
            support_y: ``[S]`` support labels (``0 .. ways-1``) or targets.

        Returns:
            An :class:`~metaxfer.learners.gradient.AdaptedPredictor`
            ``query_x [Q, *x_shape] -> logits [Q, ways]`` holding its own copy
            of the adapted parameters (queries normalised with support statistics).
        """
        params, frozen = split_params(self.model, detach=True)
        check_output_ways(self.model, {**frozen, **params}, support_x, support_y, self._checked_ways)
        inner = None if self.inner_state is None else self.inner_state.get()
        with torch.no_grad():
            adapted, _ = self._adapt_params(params, frozen, support_x, support_y, self.eval_inner_steps, state=inner)
        state = {name: t.detach().clone() for name, t in {**frozen, **adapted}.items()}
        return AdaptedPredictor(self.model, state, None if self.transductive else support_x.detach().clone())

    def extra_repr(self) -> str:
        return (
            f"inner_optimizer={self.inner_optimizer!r}, inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"eval_inner_steps={self.eval_inner_steps}, inner_data={self.inner_data!r}, "
            f"inner_batch_size={self.inner_batch_size}, persistent_inner_state={self.persistent_inner_state}, "
            f"vectorize={self.vectorize}, "
            f"task_chunk={self.task_chunk}, transductive={self.transductive}"
        )


class _AdamMoments(nn.Module):
    """The inner Adam's moments ``m``, ``v`` (one buffer per trainable model parameter) and step count ``t``.

    Buffers, so that they follow the learner across devices and into checkpoints. Parameter names hold
    dots, which buffer names may not: ``conv.0.weight`` is stored as ``m__conv__0__weight``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        self.names = list(trainable)
        for name, p in trainable.items():
            self.register_buffer(self._key("m", name), torch.zeros_like(p))
            self.register_buffer(self._key("v", name), torch.zeros_like(p))
        self.register_buffer("t", torch.zeros(()))

    @staticmethod
    def _key(moment: str, name: str) -> str:
        return f"{moment}__{name.replace('.', '__')}"

    def get(self) -> dict:
        """The state as :class:`~metaxfer.functional.update_rules.AdamUpdate` takes it (detached copies)."""
        return {
            "m": {n: getattr(self, self._key("m", n)).clone() for n in self.names},
            "v": {n: getattr(self, self._key("v", n)).clone() for n in self.names},
            "t": self.t.clone(),
        }

    @torch.no_grad()
    def set(self, moments: dict, steps: int, tasks: int) -> None:
        """Store new moments and advance ``t`` by ``steps``.

        ``moments`` are this process's means over its ``tasks`` tasks; under
        torch.distributed they become the mean over every process's tasks (one
        collective, weighted by ``tasks``), so all ranks keep the same state.
        """
        # Imported here: metaxfer.train imports the learners, so a module-level import would be circular.
        from metaxfer.train.distributed import all_reduce_weighted_mean

        keys = [(moment, name) for moment in ("m", "v") for name in self.names]
        reduced = all_reduce_weighted_mean([moments[moment][name] for moment, name in keys], float(tasks))
        for (moment, name), value in zip(keys, reduced):
            getattr(self, self._key(moment, name)).copy_(value)
        self.t += steps


def _shuffle_support(batch: Episode) -> Episode:
    """A copy of ``batch`` (``[T, S, ...]``) with each task's support set in its own random order.

    Episodes list the support class by class, so consecutive inner minibatches
    would otherwise each hold one or two classes.
    """
    tasks, shots = batch.support_y.shape[:2]
    order = torch.rand(tasks, shots, device=batch.support_y.device).argsort(dim=1)
    rows = torch.arange(tasks, device=order.device).unsqueeze(1)
    return batch._replace(support_x=batch.support_x[rows, order], support_y=batch.support_y[rows, order])


@register_learner("reptile")
def reptile(backbone: nn.Module, loss: str = "cross_entropy", **kwargs: object) -> Reptile:
    """Reptile around ``backbone``, a model mapping inputs to logits (see :class:`Reptile` for ``kwargs``).

    ``loss`` names the inner loss (``"cross_entropy"`` or ``"mse"``).
    """
    return Reptile(backbone, loss_fn=loss_by_name(loss), **kwargs)  # type: ignore[arg-type]
