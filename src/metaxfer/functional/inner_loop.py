"""Differentiable inner loops over parameter dicts (``torch.func``), shared by MAML and its family.

Everything here is a pure function of tensors and dicts of tensors: no module
is cloned, mutated or patched, so the same code runs per task, under
``torch.func.vmap`` over the tasks of a meta-batch, and under outer autograd
(the meta-gradient of Finn et al. 2017 flows through :func:`inner_loop`).

Two pieces:

* :func:`inner_loop` / :func:`sgd_step`: ``steps`` gradient-descent steps on a
  support loss, second-order by default (Finn, Abbeel & Levine, ICML 2017,
  eq. 1) or first-order (their "first-order approximation", FOMAML), with a
  scalar or per-parameter learning rate (Li et al. 2017, Meta-SGD).
* :func:`support_batch_norm`: a context in which every BatchNorm normalises
  with the batch statistics of the leading *support* rows of its input, so a
  forward pass over ``cat([support, query])`` adapts BatchNorm to the task
  without letting query examples influence each other (non-transductive), is
  exact under ``vmap`` and second-order autograd, and never reads or writes
  running-statistics buffers.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

Params = dict[str, Tensor]
LearningRate = float | Tensor | Mapping[str, float | Tensor]
SupportLoss = Callable[[Params, Tensor, Tensor], Tensor]

__all__ = [
    "InnerLoopResult",
    "LearningRate",
    "Params",
    "SupportLoss",
    "UpdateRule",
    "batch_norm_scale_shift",
    "clip_grad_norm",
    "inner_loop",
    "replayed_batch_norm_statistics",
    "sgd_step",
    "support_batch_norm",
    "support_then_query",
    "without_running_stats",
]


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: LearningRate) -> Params:
    """One plain gradient-descent step ``theta - lr * g`` on a parameter dict.

    Args:
        params: name -> parameter tensor.
        grads: name -> gradient, same keys and shapes as ``params``.
        lr: a float or scalar tensor shared by all parameters, or a mapping
            name -> float / tensor broadcastable to that parameter (Meta-SGD's
            per-parameter learning rates, Li et al. 2017, "Meta-SGD: Learning
            to Learn Quickly for Few-Shot Learning").

    Returns:
        A new dict of updated tensors (the inputs are not modified).

    Raises:
        KeyError: when ``lr`` is a mapping without an entry for some parameter.
    """
    if isinstance(lr, Mapping):
        missing = [name for name in params if name not in lr]
        if missing:
            raise KeyError(f"per-parameter learning rates lack entries for {missing}; give one for every adapted parameter")
        return {name: p - lr[name] * grads[name] for name, p in params.items()}
    return {name: p - lr * grads[name] for name, p in params.items()}


class UpdateRule(Protocol):
    """A learned or hand-written inner update: ``(params, grads, loss, step, state) -> (params, state)``.

    ``state`` is whatever the rule carries between steps (``None`` at step 0),
    e.g. the hidden states of the LSTM meta-learner (Ravi & Larochelle 2017).
    """

    def __call__(self, params: Params, grads: Params, loss: Tensor, step: int, state: Any) -> tuple[Params, Any]: ...


class InnerLoopResult(NamedTuple):
    """What :func:`inner_loop` returns with ``return_losses=True``.

    Attributes:
        params: the adapted parameters ``theta'``.
        losses: ``[steps]`` support loss *before* each step (detached), used
            to name the task and step at which a loss became non-finite.
    """

    params: Params
    losses: Tensor


def clip_grad_norm(grads: Mapping[str, Tensor], max_norm: float) -> Params:
    """Scale a gradient dict so that its global L2 norm is at most ``max_norm``.

    Written without data-dependent control flow (a ``clamp`` on the scale),
    so it works per task under ``vmap`` and is differentiable for
    second-order meta-gradients.

    Args:
        grads: name -> gradient tensor.
        max_norm: largest allowed global norm (> 0).

    Returns:
        A new dict ``g * min(1, max_norm / (||g|| + 1e-6))``.
    """
    norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {name: g * scale for name, g in grads.items()}


def inner_loop(
    support_loss: SupportLoss,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    lr: LearningRate | Sequence[LearningRate] | None,
    steps: int,
    first_order: bool = False,
    *,
    grad_clip: float | None = None,
    update: UpdateRule | None = None,
    return_losses: bool = False,
    batch_size: int | None = None,
    update_state: Any = None,
    return_state: bool = False,
) -> Params | InnerLoopResult | tuple[Params | InnerLoopResult, Any]:
    """Adapt ``params`` to one task by ``steps`` gradient steps on its support loss.

    Implements the inner update of MAML (Finn, Abbeel & Levine 2017, eq. 1),
    ``theta' = theta - lr * grad_theta L_support(theta)``, repeated ``steps``
    times. Gradients come from ``torch.func.grad``, so the function composes
    with ``torch.func.vmap`` (one call per task, vectorised) and with outer
    autograd: by default the returned parameters are differentiable functions
    of ``params`` *through* the inner gradients (second-order meta-gradients,
    Hessian-vector products included). With ``first_order=True`` each inner
    gradient is detached, so the meta-gradient treats it as a constant (the
    paper's first-order approximation, FOMAML); ``theta'`` then still depends
    on ``theta`` through the identity path.

    Every gradient-based learner of the library runs this one loop: MAML,
    FOMAML and ANIL with a scalar ``lr``, MAML++-style learned rates with a
    list of per-step rates (Antoniou et al. 2019), Meta-SGD with a dict of
    per-parameter rates (Li et al. 2017), Reptile with ``first_order`` steps
    (Nichol et al. 2018), and the LSTM meta-learner through ``update``
    (Ravi & Larochelle 2017).

    Args:
        support_loss: ``(params, x, y) -> scalar`` loss of the model with
            ``params`` on ``(x, y)``; pure (typically
            ``torch.func.functional_call`` followed by a loss).
        params: name -> tensor, the parameters to adapt (any subset of a
            model's parameters; the others are closed over by
            ``support_loss``, which is how ANIL adapts only the head).
        support_x: ``[S, *x_shape]`` support inputs of one task.
        support_y: ``[S]`` (or ``[S, *y_shape]``) support targets.
        lr: inner learning rate, see :func:`sgd_step`; a list or tuple gives
            one rate per step (its length must be ``steps``). Ignored (may be
            ``None``) when ``update`` is given.
        steps: number of gradient steps (``0`` returns ``params`` unchanged).
        first_order: detach the inner gradients (first-order MAML).
        grad_clip: clip each step's gradient to this global L2 norm
            (:func:`clip_grad_norm`); ``None`` does not clip.
        update: replaces the SGD step by ``update(params, grads, loss, step,
            state) -> (params, state)`` (a learned optimiser).
        return_losses: also return the support loss before each step.
        batch_size: each step uses the next ``batch_size`` examples of the
            support set instead of all ``S``, cycling through it in order
            (step ``k`` takes examples ``k*b .. k*b+b-1`` modulo ``S``), so
            shuffle the support set first if it is sorted by class. Reptile's
            inner minibatches (Nichol et al. 2018: 5 steps of 10 over 50
            examples, one epoch). ``None`` uses the whole set at every step.
        update_state: the ``update`` rule's state before the first step
            (``None``: the rule's own fresh state), e.g. Adam moments kept
            across tasks as in Reptile's reference code.
        return_state: return ``(result, state)``: what would be returned
            otherwise, and the ``update`` rule's state after the last step
            (``None`` for SGD steps), to carry into the next task.

    Returns:
        The adapted parameters ``theta'`` as a new dict with the keys of
        ``params``; with ``return_losses`` an :class:`InnerLoopResult`;
        with ``return_state`` a pair of that and the update rule's state.

    Raises:
        ValueError: for ``steps < 0``, a per-step ``lr`` list of the wrong
            length, ``grad_clip <= 0``, ``batch_size <= 0``, or neither ``lr``
            nor ``update``.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> params = dict(model.named_parameters())
        >>> def support_loss(p, x, y):
        ...     return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)
        >>> adapted = inner_loop(support_loss, params, torch.randn(6, 4), torch.arange(3).repeat(2), 0.4, 2)
        >>> sorted(adapted)
        ['bias', 'weight']
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be a positive norm or None, got {grad_clip}")
    if update is None and lr is None:
        raise ValueError("give an inner learning rate (lr) or an update rule")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"batch_size must be a positive number of examples or None, got {batch_size}")
    per_step = isinstance(lr, (list, tuple))
    if per_step and len(lr) < steps:  # type: ignore[arg-type]
        raise ValueError(f"{len(lr)} per-step learning rates for {steps} steps; give one per step")  # type: ignore[arg-type]
    grad_fn = torch.func.grad_and_value(support_loss)
    adapted: Params = dict(params)
    losses: list[Tensor] = []
    state: Any = update_state
    num_support = support_x.shape[0]
    minibatches = batch_size is not None and batch_size < num_support
    for step in range(steps):
        x, y = support_x, support_y
        if minibatches:
            # A constant index tensor (not a data-dependent one) keeps the step vmap-able.
            start = step * batch_size  # type: ignore[operator]
            index = torch.arange(start, start + batch_size, device=support_x.device) % num_support  # type: ignore[operator]
            x, y = support_x.index_select(0, index), support_y.index_select(0, index)
        grads, loss = grad_fn(adapted, x, y)
        losses.append(loss.detach())
        if first_order:
            # Detaching at the outer level keeps the step's value but drops its
            # dependence on theta: the meta-gradient sees d theta'/d theta = I.
            grads = {name: g.detach() for name, g in grads.items()}
        if grad_clip is not None:
            grads = clip_grad_norm(grads, grad_clip)
        if update is not None:
            adapted, state = update(adapted, grads, loss, step, state)
        else:
            adapted = sgd_step(adapted, grads, lr[step] if per_step else lr)  # type: ignore[index,arg-type]
    result: Params | InnerLoopResult = adapted
    if return_losses:
        anchor = next(iter(params.values()))
        result = InnerLoopResult(adapted, torch.stack(losses) if losses else anchor.new_zeros(0))
    return (result, state) if return_state else result


# --- BatchNorm with support statistics ---------------------------------------------------------

_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


_Mode = TypeVar("_Mode", bound="_SupportBatchNormMode")


class _SupportBatchNormMode(TorchFunctionMode):
    """Torch-function mode that reroutes ``F.batch_norm`` (see :func:`support_batch_norm`).

    With ``record`` (a list) every call appends the ``(mean, var)`` it
    normalised with; with ``replay`` (such a list) the ``i``-th call
    normalises with the ``i``-th recorded statistics instead of its own.
    """

    def __init__(
        self,
        num_support: int | None,
        record: list[tuple[Tensor, Tensor]] | None = None,
        replay: list[tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.num_support = num_support
        self.record = record
        self.replay = replay
        self.calls = 0

    def __enter__(self: _Mode) -> _Mode:  # noqa: PYI019 (typing.Self is Python >= 3.11; we support 3.10)
        _active_modes().append(self)
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        _active_modes().pop()
        super().__exit__(*exc)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        x = a["input"]
        if self.replay is not None:
            stats = self.take_replayed()
            if stats is None:
                raise RuntimeError(
                    f"the model called BatchNorm more often on the query ({self.calls + 1}+ calls) than on the support "
                    f"({len(self.replay)}); support statistics need the same layers to run in the same order on both"
                )
            mean, var = stats
        else:
            mean, var = _statistics(x, self.num_support)
            if self.record is not None:
                self.record.append((mean, var))
            self.calls += 1
        return _apply_statistics(x, mean, var, a["weight"], a["bias"], a["eps"])

    def take_replayed(self) -> tuple[Tensor, Tensor] | None:
        """The next recorded statistics, counted as a BatchNorm call; None without a replay or when none is left."""
        if self.replay is None or self.calls >= len(self.replay):
            return None
        self.calls += 1
        return self.replay[self.calls - 1]


_MODES = threading.local()


def _active_modes() -> list[_SupportBatchNormMode]:
    """This thread's entered support-statistics modes, innermost last."""
    if not hasattr(_MODES, "stack"):
        _MODES.stack = []
    return _MODES.stack


def replayed_batch_norm_statistics() -> tuple[Tensor, Tensor] | None:
    """Take the statistics the next BatchNorm call would normalise with in the query pass of :func:`support_then_query`.

    For layers that can fold a known normalisation into their own computation
    (:class:`metaxfer.backbones.conv4.ConvBlock` folds it into the
    convolution's weights and bias, saving full-size passes over the query
    activations). Taking the statistics counts as that BatchNorm call, so the
    caller must then not call ``F.batch_norm`` for the same layer.

    Returns:
        ``(mean, var)``, each ``[1, C, 1, ...]`` (the support rows' mean and
        biased variance at this layer), or ``None`` outside a query pass (no
        statistics are known in advance: the layer must run as usual).
    """
    modes = _active_modes()
    return modes[-1].take_replayed() if modes else None


def _statistics(x: Tensor, num_support: int | None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance ``[1, C, 1, ...]`` of ``x[:num_support]`` (all rows if None)."""
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape [N, C, *], got {tuple(x.shape)}")
    stats_rows = x if num_support is None else x[:num_support]
    if stats_rows.shape[0] == 0:
        raise ValueError("BatchNorm statistics need at least one support example; the support set is empty")
    var, mean = torch.var_mean(stats_rows, dim=[0, *range(2, x.dim())], correction=0, keepdim=True)
    return mean, var


def _apply_statistics(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over ``[N, C, *]``, per channel.

    Written with elementary ops rather than ``torch.batch_norm``: the native
    kernel cannot take gradients through externally supplied statistics, and
    its vmap rule gives wrong second-order gradients for the affine weight and
    bias (functorch issue #534); this form is exact under ``vmap``, ``grad``
    and their compositions. Statistics and affine are folded into one
    per-channel scale and shift (tiny tensors) first, so the full-size
    activation sees a single fused multiply-add: forward and backward then make
    far fewer passes over ``[N, C, H, W]`` (these passes, not the
    convolutions, dominate second-order MAML on CPU).
    """
    scale, shift = batch_norm_scale_shift(mean, var, weight, bias, eps)
    return torch.addcmul(shift, x, scale)


def batch_norm_scale_shift(mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
                           eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``(x - mean) / sqrt(var + eps) * weight + bias == x * scale + shift``.

    Args:
        mean, var: per-channel statistics, ``[C]`` or ``[1, C, 1, ...]``.
        weight, bias: the affine ``[C]`` (or None), reshaped to ``mean``'s shape.

    Returns:
        ``scale`` and ``shift``, each of ``mean``'s shape.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.reshape(mean.shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(mean.shape)
    return scale, shift


def support_then_query(fn: Callable[[Tensor], Tensor], support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(support_x), fn(query_x))`` where every BatchNorm in ``fn(query_x)`` uses the support statistics.

    Runs ``fn`` on the support with batch statistics, recording each
    BatchNorm call's mean and variance in order, then on the query, where
    the ``i``-th BatchNorm call normalises with the ``i``-th recorded
    statistics: the same result as one pass over ``cat([support, query])``
    under :func:`support_batch_norm` (non-transductive: a query row's output
    does not depend on the other query rows), without concatenating and
    without slicing the support rows out of every activation (whose backward
    writes a full-size zero gradient). Gradients flow through the statistics
    into the support pass; exact under ``vmap`` and ``grad``. Layers that
    know their statistics in advance may fold them into their own weights
    during the query pass (:func:`replayed_batch_norm_statistics`; Conv4's
    blocks do).

    Args:
        fn: a pure forward pass ``[N, *x_shape] -> [N, ...]`` whose BatchNorm
            layers go through ``torch.nn.functional.batch_norm`` in the same
            order for any input (e.g. ``functional_call`` of a module with
            :func:`without_running_stats` buffers).
        support_x: ``[S, *x_shape]``.
        query_x: ``[Q, *x_shape]``.

    Returns:
        ``(support_out [S, ...], query_out [Q, ...])``.

    Raises:
        RuntimeError: ``fn`` called BatchNorm a different number of times on the two inputs.
    """
    stats: list[tuple[Tensor, Tensor]] = []
    with _SupportBatchNormMode(None, record=stats):
        support_out = fn(support_x)
    replay = _SupportBatchNormMode(None, replay=stats)
    with replay:
        query_out = fn(query_x)
    if replay.calls != len(stats):
        raise RuntimeError(
            f"the model called BatchNorm {replay.calls} times on the query but {len(stats)} times on the support; "
            "support statistics need the same layers to run in the same order on both"
        )
    return support_out, query_out


def support_batch_norm(num_support: int | None = None) -> TorchFunctionMode:
    """Context manager: BatchNorm normalises with the statistics of the first ``num_support`` rows.

    Inside the context, every call to ``torch.nn.functional.batch_norm`` (which
    all ``nn.BatchNorm1d/2d/3d`` layers use) computes
    ``(x - mean) / sqrt(var + eps) * weight + bias`` where ``mean`` and the
    biased ``var`` are taken over the first ``num_support`` rows of its input
    ``x [N, C, *]`` (all rows when ``num_support`` is None), per channel. The
    layer's ``training`` flag, running statistics and momentum are ignored and
    the running statistics are never updated. A layer in training mode still
    increments its ``num_batches_tracked`` counter itself (an in-place write
    that ``vmap`` and ``grad`` reject); pass :func:`without_running_stats`
    as buffers to ``torch.func.functional_call`` to switch that off too.

    Run a forward pass over ``torch.cat([support_x, query_x])`` with
    ``num_support = len(support_x)``: the support rows are normalised exactly
    as in a training-mode pass over the support alone, and each query row is
    normalised with the same support statistics, so its output does not
    depend on the other query rows (non-transductive). This is a sanctioned
    PyTorch extension point (``torch.overrides.TorchFunctionMode``), scoped to
    the ``with`` block and the current thread; it does not patch modules.

    Args:
        num_support: number of leading rows whose statistics normalise every
            row; ``None`` uses the whole batch (plain training-mode BatchNorm).

    Returns:
        A context manager (``with support_batch_norm(5): ...``).

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> support, query = torch.randn(5, 3), torch.randn(2, 3)
        >>> with support_batch_norm(5):
        ...     out = torch.func.functional_call(bn, without_running_stats(bn), (torch.cat([support, query]),), strict=False)
        >>> torch.allclose(out[:5], torch.nn.functional.batch_norm(support, None, None, bn.weight, bn.bias, True))
        True
    """
    if num_support is not None and num_support < 1:
        raise ValueError(f"num_support must be >= 1 (or None for the whole batch), got {num_support}")
    return _SupportBatchNormMode(num_support)


def without_running_stats(module: nn.Module) -> dict[str, None]:
    """Buffer overrides for ``torch.func.functional_call`` that hide every BatchNorm's running state.

    Maps ``running_mean``, ``running_var`` and ``num_batches_tracked`` of each
    ``nn.BatchNorm*`` layer in ``module`` to ``None``. A layer without them
    normalises with batch statistics and writes no buffer, whatever its
    ``training`` flag: this is what makes a functional forward pass pure
    (no in-place updates, which ``vmap`` and ``grad`` reject, and no change
    to the module's state).

    Args:
        module: any module; layers other than BatchNorm are not affected.

    Returns:
        ``{"<layer>.running_mean": None, ...}`` (empty when there is no BatchNorm).
    """
    overrides: dict[str, None] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, _BatchNorm):
            prefix = f"{name}." if name else ""
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(layer, buffer, None) is not None:
                    overrides[prefix + buffer] = None
    return overrides
