"""Gradient-based meta-learners: MAML and the family that shares its functional inner loop.

The inner loop is pure (:mod:`metaxfer.functional.inner_loop`): parameters
live in a dict, the model runs through ``torch.func.functional_call``, inner
gradients come from ``torch.func.grad`` and the tasks of a meta-batch are
vectorised with ``torch.func.vmap``. Modules are never cloned, mutated or
patched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaxfer.errors import ConfigError, EpisodeError, NonFiniteLossError
from metaxfer.functional.inner_loop import (
    InnerLoopResult,
    LearningRate,
    Params,
    SupportLoss,
    inner_loop,
    support_batch_norm,
    support_then_query,
    without_running_stats,
)
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import register_learner
from metaxfer.tasks.episode import Episode

__all__ = ["MAML", "AdaptedPredictor", "maml"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, num_support: int | None) -> Tensor:
    """Pure forward pass of ``model`` with ``params``; BatchNorm uses the statistics of ``x[:num_support]``.

    Running statistics are hidden (:func:`without_running_stats`), so the
    pass writes no buffer and behaves the same in ``train()`` and ``eval()``.
    """
    with support_batch_norm(num_support):
        return torch.func.functional_call(model, (dict(params), without_running_stats(model)), (x,), strict=False)


def check_output_ways(model: nn.Module, params: Mapping[str, Tensor], support_x: Tensor, support_y: Tensor,
                      checked: set[int]) -> None:
    """Fail early, with the fix, when ``model``'s logits do not match the task's number of ways.

    A fixed-size head trained 5-way would otherwise fail deep inside the loss
    (``IndexError: Target 5 is out of bounds``) on a 20-way task, or silently
    spread a 3-way task over 5 logits. One forward pass per new number of ways
    (remembered in ``checked``); regression targets are not checked.

    Args:
        model: maps ``[N, *x_shape]`` to ``[N, ways]`` logits.
        params: its weights, as for :func:`torch.func.functional_call`.
        support_x: ``[S, *x_shape]`` one task's support inputs.
        support_y: ``[S]`` labels ``0 .. ways-1``.
        checked: numbers of ways already found to match (updated).

    Raises:
        EpisodeError: naming the model's output shape and the ways it needs.
    """
    if support_y.is_floating_point() or support_y.numel() == 0:
        return
    ways = int(support_y.max().item()) + 1
    if ways in checked:
        return
    with torch.no_grad():
        out = _forward(model, params, support_x, None)
    if out.dim() != 2 or out.shape[1] != ways:
        raise EpisodeError(
            f"the model outputs shape {tuple(out.shape)} for {support_x.shape[0]} support examples, but the "
            f"episodes are {ways}-way: its last layer must output [N, {ways}] logits (e.g. Conv4(num_classes={ways})); "
            f"a model trained with a {out.shape[-1]}-way head can only be used on {out.shape[-1]}-way tasks"
        )
    checked.add(ways)


def query_outputs(model: nn.Module, params: Mapping[str, Tensor], support_x: Tensor, query_x: Tensor,
                  transductive: bool = False) -> Tensor:
    """Outputs ``[Q, ...]`` of ``model`` with ``params`` on ``query_x [Q, *x_shape]`` under the BatchNorm policy.

    Non-transductive (default): every BatchNorm normalises the queries with the
    statistics the support ``[S, *x_shape]`` has at that layer
    (:func:`metaxfer.functional.support_then_query`), so a query's output does
    not depend on the other queries. ``transductive``: the query batch's own
    statistics.
    """
    if transductive:
        return _forward(model, params, query_x, None)

    def call(x: Tensor) -> Tensor:
        return torch.func.functional_call(model, (dict(params), without_running_stats(model)), (x,), strict=False)

    return support_then_query(call, support_x, query_x)[1]


def support_loss_of(model: nn.Module, loss_fn: LossFn, fixed: Mapping[str, Tensor]) -> SupportLoss:
    """The inner-loop objective ``(params, x, y) -> loss_fn(model(x), y)`` with ``fixed ∪ params`` as weights.

    BatchNorm normalises ``x`` with its own batch statistics (the support set's),
    running statistics untouched; every learner of the gradient family adapts on it.
    """

    def support_loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(_forward(model, {**fixed, **p}, x, None), y)

    return support_loss


class AdaptedPredictor:
    """A model adapted to one task: ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    Holds its own detached copy of the adapted parameters and the task's
    support inputs; it shares only the module *structure* with the learner,
    so later training of the learner does not change its predictions and
    calling it changes nothing in the learner.

    Args:
        model: the learner's module (used through ``functional_call`` only).
        params: name -> adapted parameter tensor (all of ``model``'s parameters).
        support_x: ``[S, *x_shape]`` support inputs whose BatchNorm statistics
            normalise the queries; ``None`` for transductive prediction (query
            batch statistics).
    """

    def __init__(self, model: nn.Module, params: Params, support_x: Tensor | None) -> None:
        self.model = model
        self.params = params
        self.support_x = support_x

    @property
    def transductive(self) -> bool:
        """True when a query's logits depend on the other queries (query-batch BatchNorm statistics)."""
        return self.support_x is None

    @torch.no_grad()
    def __call__(self, query_x: Tensor) -> Tensor:
        """``query_x [Q, *x_shape] -> logits [Q, ways]``."""
        # Support statistics: each query row is normalised exactly like the support was
        # during adaptation, independently of the other queries.
        return query_outputs(self.model, self.params, self.support_x, query_x, transductive=self.support_x is None)


class MAML(Learner):
    """Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), first or second order.

    "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
    https://arxiv.org/abs/1703.03400. Meta-learns an initialisation ``theta``
    such that ``inner_steps`` gradient steps of size ``inner_lr`` on a task's
    support set (eq. 1) give low query loss; the meta-objective is the mean
    query loss after adaptation over the tasks of a meta-batch (eq. 3), and
    its gradient flows through the inner gradient steps (second order)
    unless ``first_order=True`` (the paper's first-order approximation, FOMAML).

    Which parameters adapt: those named by ``adapt`` (all parameters with
    ``requires_grad=True`` by default). The other trainable parameters are
    meta-learned by the outer step but kept fixed in the inner loop (ANIL,
    Raghu et al. 2020, is ``adapt=["head"]``); frozen ones
    (``requires_grad=False``) are used as they are.

    BatchNorm policy (support statistics, non-transductive, exact):
        Every BatchNorm layer normalises with the batch statistics of the
        task's *support set*, whatever the module's ``train()``/``eval()``
        mode; running statistics are never read nor updated.

        * Inner loop: a plain batch-statistics pass over the support at every
          step, i.e. statistics of the current adapted weights (MAML++'s
          "per-step" statistics come for free; nothing is carried across tasks).
        * Query (in ``loss`` and in the predictor from ``adapt``): one pass
          over ``cat([support, query])`` with the adapted parameters, where
          each BatchNorm uses the mean and biased variance of the support
          rows only (:func:`metaxfer.functional.support_batch_norm`). A query
          example's logits therefore do not depend on the other query
          examples, and training optimises exactly what evaluation computes
          (the meta-gradient also flows through the support statistics).

        Why not running statistics: they average over tasks whose inputs the
        inner loop has since moved away from, and their in-place updates are
        impossible inside ``vmap``/``grad``. Why not query statistics: they
        make evaluation transductive (the original MAML code does this; it
        is available as ``transductive=True``, which normalises query
        examples with their own batch statistics in training and prediction).

        The normalisation is written with elementary tensor ops, not the
        native ``batch_norm`` kernel, so second-order meta-gradients are exact
        under ``vmap`` for affine BatchNorm too (the native kernel's vmap rule
        gets them wrong, functorch issue #534); ``Conv4(norm="batchnorm")`` and
        ``norm="batchnorm_split"`` both work. Layers that do not go through
        ``torch.nn.functional.batch_norm`` are not covered by this policy.

    Args:
        model: maps ``[N, *x_shape]`` inputs to ``[N, ways]`` logits (or
            regression outputs), e.g. ``Conv4(num_classes=5, norm="batchnorm_split")``.
        inner_lr: inner-loop step size (0.4 for Omniglot in the paper); the
            initial value when ``learn_inner_lr``.
        inner_steps: inner gradient steps in meta-training (1 for Omniglot 5-way).
        first_order: detach the inner gradients (first-order MAML).
        eval_inner_steps: inner steps in :meth:`adapt`; defaults to ``inner_steps``
            (the paper uses 3 at test time for Omniglot).
        vectorize: vectorise the meta-batch with ``torch.func.vmap`` (``True``)
            or loop over tasks (``False``, the reference implementation; same
            result). ``None`` (default) picks vmap, except on CPU for a model
            with a wide convolution (a ``Conv2d`` with >= 32 output channels):
            there the loop keeps oneDNN's channels-last kernels, which vmap
            cannot use (Conv4-64 MAML: loop 1.7x faster than vmap), while for
            narrow or convolution-free models the per-task Python overhead
            dominates and vmap wins (Conv4-8: 1.8x, the sinusoid MLP: 10x;
            docs/results.md). Off the CPU one batched kernel replaces a launch
            per task.
        task_chunk: with ``vectorize``, vmap over chunks of at most this many
            tasks. This bounds the transient memory of the batched kernels
            only: the activations saved for backward grow with the number of
            tasks either way (split the meta-batch across several
            ``loss``/``backward`` calls to bound those).
        transductive: normalise queries with query batch statistics (see above).
        loss_fn: ``(outputs [N, ...], targets [N, ...]) -> scalar`` used in the
            inner and outer loop; cross-entropy by default, e.g. MSE for
            regression (sinusoids).
        adapt: names (or name prefixes, e.g. ``"head"``) of the parameters the
            inner loop adapts; ``None`` adapts every trainable parameter.
        inner_grad_clip: clip each inner step's gradient to this global L2
            norm (per task); ``None`` does not clip.
        learn_inner_lr: meta-learn one inner learning rate per adapted
            parameter tensor and per inner step, initialised to ``inner_lr``
            (MAML++ "LSLR", Antoniou, Edwards & Storkey, ICLR 2019, "How to
            train your MAML"); test-time steps beyond ``inner_steps`` reuse
            the last step's rates.

    Shapes:
        ``loss(batch)``: ``support_x [T, S, *x_shape]``, ``support_y [T, S]``,
        ``query_x [T, Q, *x_shape]``, ``query_y [T, Q]``; returns a scalar.
        ``adapt(support_x [S, *x_shape], support_y [S])`` returns a predictor
        ``query_x [Q, *x_shape] -> logits [Q, ways]``.

    Raises:
        ConfigError: negative step counts, a non-floating-point parameter,
            an ``adapt`` entry that matches no trainable parameter, nothing to adapt.
        EpisodeError: (from ``loss``) a model whose number of outputs is not
            the episodes' number of ways.
        NonFiniteLossError: (from ``loss``) a NaN or infinite support loss in
            the inner loop; the message names the task and the step.

    Attributes:
        last_metrics: ``{"accuracy": float}`` mean query accuracy after
            adaptation of the last ``loss`` call (``{"mse": float}`` for regression).

    Example:
        >>> from metaxfer.backbones import Conv4
        >>> learner = MAML(Conv4(num_classes=5, norm="batchnorm_split"), inner_lr=0.4, inner_steps=1)
        >>> batch = Episode(torch.randn(4, 5, 1, 28, 28), torch.arange(5).repeat(4, 1),
        ...                 torch.randn(4, 10, 1, 28, 28), torch.arange(5).repeat(4, 2))
        >>> learner.loss(batch).backward()
        >>> predict = learner.adapt(batch.support_x[0], batch.support_y[0])
        >>> predict(batch.query_x[0]).shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        first_order: bool = False,
        eval_inner_steps: int | None = None,
        vectorize: bool | None = None,
        task_chunk: int | None = None,
        transductive: bool = False,
        loss_fn: LossFn = F.cross_entropy,
        adapt: Sequence[str] | None = None,
        inner_grad_clip: float | None = None,
        learn_inner_lr: bool = False,
    ) -> None:
        super().__init__()
        if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
            raise ConfigError(f"inner_steps and eval_inner_steps must be >= 0, got {inner_steps} and {eval_inner_steps}")
        if task_chunk is not None and task_chunk < 1:
            raise ConfigError(f"task_chunk must be a positive number of tasks or None, got {task_chunk}")
        if inner_grad_clip is not None and inner_grad_clip <= 0:
            raise ConfigError(f"inner_grad_clip must be a positive gradient norm or None, got {inner_grad_clip}")
        if inner_lr <= 0 and not learn_inner_lr:
            raise ConfigError(f"inner_lr must be > 0, got {inner_lr}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = self.inner_steps if eval_inner_steps is None else int(eval_inner_steps)
        self.first_order = bool(first_order)
        self.order = "first" if first_order else "second"
        self.vectorize = None if vectorize is None else bool(vectorize)
        self.task_chunk = task_chunk
        self.transductive = bool(transductive)
        self.loss_fn = loss_fn
        self.inner_grad_clip = inner_grad_clip
        self.adapted_names = self._select_adapted(adapt)
        self.inner_lrs: nn.Parameter | None = None
        if learn_inner_lr:
            like = next(self.model.parameters())
            rates = torch.full((max(self.inner_steps, 1), len(self.adapted_names)), self.inner_lr, dtype=like.dtype,
                               device=like.device)
            self.inner_lrs = nn.Parameter(rates)
        self.last_metrics: dict[str, float] = {}
        self._checked_ways: set[int] = set()
        # For vectorize=None on CPU (see Args): wide convolutions run faster per task, in channels-last layout.
        self._wide_convolution = any(isinstance(m, nn.Conv2d) and m.out_channels >= 32 for m in model.modules())

    def _select_adapted(self, adapt: Sequence[str] | None) -> list[str]:
        """Names of the parameters the inner loop adapts (validated; see ``adapt``)."""
        trainable = []
        for name, p in self.model.named_parameters():
            if not p.dtype.is_floating_point:
                raise ConfigError(
                    f"parameter {name!r} has dtype {p.dtype}: gradient-based learners can only adapt floating-point "
                    "parameters; store integer state as a buffer (module.register_buffer) instead"
                )
            if p.requires_grad:
                trainable.append(name)
        if adapt is None:
            chosen = trainable
        else:
            if isinstance(adapt, str):
                adapt = [adapt]
            chosen = []
            for key in adapt:
                hits = [n for n in trainable if n == key or n.startswith(key + ".")]
                if not hits:
                    frozen = [n for n, p in self.model.named_parameters() if not p.requires_grad and (n == key or n.startswith(key + "."))]
                    why = (f"it names parameters that need no gradient (requires_grad=False: {frozen[:4]}); unfreeze them"
                           if frozen else "no parameter has that name or prefix; the trainable ones are under "
                           f"{list(dict.fromkeys(n.rpartition('.')[0] or n for n in trainable))}")
                    raise ConfigError(f"adapt entry {key!r} cannot be adapted: {why}")
                chosen += [n for n in hits if n not in chosen]
        if not chosen:
            raise ConfigError("the model has no trainable parameter to adapt (all have requires_grad=False)")
        return chosen

    # -- pieces shared by loss and adapt -------------------------------------------------------

    def _split_params(self, detach: bool) -> tuple[Params, Params]:
        """(adapted, fixed) parameter dicts: those the inner loop adapts, and all the others."""
        adapted, fixed = {}, {}
        chosen = set(self.adapted_names)
        for name, p in self.model.named_parameters():
            (adapted if name in chosen else fixed)[name] = p.detach() if detach else p
        return adapted, fixed

    def _inner_lr(self, detach: bool) -> LearningRate | list[LearningRate]:
        """The inner step size: a float, or per-step dicts of learned per-tensor rates (MAML++)."""
        if self.inner_lrs is None:
            return self.inner_lr
        rates = self.inner_lrs.detach() if detach else self.inner_lrs
        steps = max(self.inner_steps, self.eval_inner_steps, 1)
        last = rates.shape[0] - 1
        return [{name: rates[min(s, last), i] for i, name in enumerate(self.adapted_names)} for s in range(steps)]

    def _adapt_params(
        self, params: Params, fixed: Params, support_x: Tensor, support_y: Tensor, steps: int, lr: LearningRate | list[LearningRate]
    ) -> InnerLoopResult:
        """Run the shared inner loop on one task: (adapted parameters, support losses ``[steps]``)."""
        return inner_loop(  # type: ignore[return-value]
            support_loss_of(self.model, self.loss_fn, fixed), params, support_x, support_y, lr, steps, self.first_order,
            grad_clip=self.inner_grad_clip, return_losses=True,
        )

    def _query_outputs(self, params: Params, support_x: Tensor, query_x: Tensor) -> Tensor:
        """Outputs ``[Q, ...]`` on the query with ``params`` under the BatchNorm policy."""
        return query_outputs(self.model, params, support_x, query_x, self.transductive)

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
        """One task: (query loss after adaptation, detached query outputs ``[Q, ...]``, support losses ``[steps]``)."""
        adapted, inner_losses = self._adapt_params(params, fixed, support_x, support_y, self.inner_steps, lr)
        out = self._query_outputs({**fixed, **adapted}, support_x, query_x)
        return self.loss_fn(out, query_y), out.detach(), inner_losses

    @staticmethod
    def _raise_on_nonfinite(inner_losses: Tensor) -> None:
        """Name the first task and inner step whose support loss is NaN or infinite (``[T, steps]``)."""
        bad = ~torch.isfinite(inner_losses)
        if inner_losses.numel() and bool(bad.any()):
            task, step = (int(i) for i in bad.nonzero()[0])
            raise NonFiniteLossError(
                f"the support loss of task {task} is {inner_losses[task, step].item()} at inner step {step}: lower "
                "inner_lr, set inner_grad_clip, or check that task's inputs for NaN/inf values"
            )

    # -- the learner contract ------------------------------------------------------------------

    def loss(self, batch: Episode) -> Tensor:
        """Mean query loss after adaptation over the ``T`` tasks of ``batch`` (Finn et al. 2017, eq. 3).

        Args:
            batch: an episode with ``[T, ...]`` tensors (an unbatched one counts as ``T = 1``).

        Returns:
            Scalar meta-loss, differentiable w.r.t. the meta-parameters
            (through the inner loop unless ``first_order``). Sets
            ``self.last_metrics``.

        Raises:
            EpisodeError: the model's output size differs from the episodes' ways.
            NonFiniteLossError: a support loss became NaN/inf (names task and step).
        """
        batch = batch.batch()
        params, fixed = self._split_params(detach=False)
        check_output_ways(self.model, {**fixed, **params}, batch.support_x[0], batch.support_y[0], self._checked_ways)
        lr = self._inner_lr(detach=False)
        vectorize = self.vectorize if self.vectorize is not None else (
            batch.support_x.device.type != "cpu" or not self._wide_convolution)
        if vectorize:
            task_fn = torch.func.vmap(
                self._task_loss,
                in_dims=(None, None, None, 0, 0, 0, 0),
                # Tasks draw independent dropout masks, as in the per-task loop.
                randomness="different",
            )
            chunk = self.task_chunk or batch.num_tasks
            parts = [
                task_fn(params, fixed, lr, *chunk_tensors)
                for chunk_tensors in zip(*(t.split(chunk) for t in batch))
            ]
            losses, outputs, inner = (torch.cat([p[i] for p in parts]) for i in range(3))
        else:
            results = [self._task_loss(params, fixed, lr, *batch.task(t)) for t in range(batch.num_tasks)]
            losses, outputs, inner = (torch.stack([r[i] for r in results]) for i in range(3))
        self._raise_on_nonfinite(inner)
        self.last_metrics = self._metrics(outputs, batch.query_y)
        return losses.mean()

    @staticmethod
    @torch.no_grad()
    def _metrics(outputs: Tensor, targets: Tensor) -> dict[str, float]:
        """``{"accuracy": ...}`` for classification outputs ``[T, Q, ways]`` and labels ``[T, Q]``,
        ``{"mse": ...}`` for regression outputs and targets of one shape; else ``{}``."""
        if targets.dtype.is_floating_point:
            return {"mse": F.mse_loss(outputs, targets).item()} if outputs.shape == targets.shape else {}
        if outputs.dim() != targets.dim() + 1:
            return {}
        return {"accuracy": (outputs.argmax(-1) == targets).float().mean().item()}

    def adapt(self, support_x: Tensor, support_y: Tensor) -> AdaptedPredictor:
        """Adapt to one task with ``eval_inner_steps`` inner steps; never mutates the learner.

        Args:
            support_x: ``[S, *x_shape]`` support inputs of one task.
            support_y: ``[S]`` support labels (``0 .. ways-1``) or targets.

        Returns:
            An :class:`AdaptedPredictor` ``query_x [Q, *x_shape] -> logits [Q, ways]``
            holding detached adapted parameters.

        Raises:
            EpisodeError: the model's output size differs from the task's ways.
            NonFiniteLossError: the support loss became NaN/inf (names the step).
        """
        # Detached inputs: the inner gradients come from torch.func.grad (which works under an
        # outer no_grad too), and no graph back to the learner's parameters is built.
        params, fixed = self._split_params(detach=True)
        check_output_ways(self.model, {**fixed, **params}, support_x, support_y, self._checked_ways)
        adapted, inner = self._adapt_params(params, fixed, support_x, support_y, self.eval_inner_steps,
                                            self._inner_lr(detach=True))
        self._raise_on_nonfinite(inner.unsqueeze(0))
        # Clone so that the predictor owns its tensors (with 0 steps they would alias the learner's).
        state = {name: t.detach().clone() for name, t in {**fixed, **adapted}.items()}
        return AdaptedPredictor(self.model, state, None if self.transductive else support_x.detach().clone())

    def extra_repr(self) -> str:
        adapted = "all" if len(self.adapted_names) == sum(1 for p in self.model.parameters() if p.requires_grad) else self.adapted_names
        return (
            f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, eval_inner_steps={self.eval_inner_steps}, "
            f"order={self.order!r}, vectorize={'auto' if self.vectorize is None else self.vectorize}, task_chunk={self.task_chunk}, "
            f"transductive={self.transductive}, adapt={adapted}, learn_inner_lr={self.inner_lrs is not None}"
        )


LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def loss_by_name(name: str) -> LossFn:
    """The loss function a config names: ``"cross_entropy"`` (classification) or ``"mse"`` (regression)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


@register_learner("maml")
def maml(backbone: nn.Module, loss: str = "cross_entropy", **kwargs: object) -> MAML:
    """MAML around ``backbone``, a model mapping inputs to logits (see :class:`MAML` for ``kwargs``).

    ``loss`` names the inner and outer loss (``"cross_entropy"`` or ``"mse"``).
    """
    return MAML(backbone, loss_fn=loss_by_name(loss), **kwargs)  # type: ignore[arg-type]


@register_learner("fomaml")
def fomaml(backbone: nn.Module, loss: str = "cross_entropy", **kwargs: object) -> MAML:
    """First-order MAML (Finn et al. 2017, section 5.2): :class:`MAML` with ``first_order=True``."""
    if kwargs.pop("first_order", True) is not True:
        raise ConfigError("fomaml is first-order MAML; for second order use learner: maml")
    return MAML(backbone, first_order=True, loss_fn=loss_by_name(loss), **kwargs)  # type: ignore[arg-type]
