"""Helpers shared by the learners that adapt a parameter dict per task (Reptile, the LSTM meta-learner).

They reuse MAML's pure forward pass and BatchNorm policy (``_forward`` in
:mod:`metaxfer.learners.gradient`), so every gradient-based learner normalises
queries the same way: with the statistics of the task's support set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from metaxfer.errors import ConfigError
from metaxfer.functional.inner_loop import Params
from metaxfer.learners.gradient import query_outputs as _query_outputs
from metaxfer.tasks.episode import Episode


def check_steps(inner_steps: int, eval_inner_steps: int | None, task_chunk: int | None) -> None:
    """Raise :class:`ConfigError` for negative step counts or a non-positive ``task_chunk``."""
    if inner_steps < 0 or (eval_inner_steps is not None and eval_inner_steps < 0):
        raise ConfigError(
            f"inner_steps and eval_inner_steps must be >= 0 (0 = no adaptation), got {inner_steps} and {eval_inner_steps}"
        )
    if task_chunk is not None and task_chunk < 1:
        raise ConfigError(f"task_chunk must be a positive number of tasks or None, got {task_chunk}")


def split_params(model: nn.Module, detach: bool) -> tuple[Params, Params]:
    """``(adapted, frozen)``: the parameters that require grad, and the others."""
    adapted, frozen = {}, {}
    for name, p in model.named_parameters():
        (adapted if p.requires_grad else frozen)[name] = p.detach() if detach else p
    return adapted, frozen


def query_outputs(model: nn.Module, params: Params, support_x: Tensor, query_x: Tensor, transductive: bool) -> Tensor:
    """Outputs ``[Q, ...]`` of ``model`` with ``params`` on ``query_x [Q, *x_shape]``.

    BatchNorm uses the statistics of ``support_x [S, *x_shape]`` (non-transductive),
    or of the query batch itself when ``transductive``: MAML's policy, see
    :func:`metaxfer.learners.gradient.query_outputs`.
    """
    return _query_outputs(model, params, support_x, query_x, transductive)


def map_tasks(fn: Callable[..., Any], shared: tuple[Any, ...], batch: Episode, vectorize: bool,
              task_chunk: int | None) -> list[Any]:
    """Apply ``fn(*shared, support_x, support_y, query_x, query_y)`` to every task of ``batch``.

    With ``vectorize``, ``torch.func.vmap`` runs the tasks together (in chunks
    of at most ``task_chunk``; tasks draw independent dropout masks as in the
    loop); otherwise a Python loop over tasks, the reference.

    Returns:
        One result per vmapped chunk (leaves carry a leading ``[chunk]`` task
        dimension), or one per task with ``vectorize=False`` (no task
        dimension): use :func:`stack_results` to get ``[T, ...]`` leaves.
    """
    if not vectorize:
        return [fn(*shared, *batch.task(t)) for t in range(batch.num_tasks)]
    task_fn = torch.func.vmap(fn, in_dims=(*(None for _ in shared), 0, 0, 0, 0), randomness="different")
    chunk = task_chunk or batch.num_tasks
    return [task_fn(*shared, *tensors) for tensors in zip(*(t.split(chunk) for t in batch))]


def stack_results(parts: list[Any], vectorized: bool) -> Any:
    """Join the outputs of :func:`map_tasks` (tensors, or tuples / dicts of them) into ``[T, ...]`` leaves."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(stack_results([p[i] for p in parts], vectorized) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: stack_results([p[k] for p in parts], vectorized) for k in first}
    return (torch.cat if vectorized else torch.stack)(parts)


@torch.no_grad()
def classification_metrics(outputs: Tensor, targets: Tensor) -> dict[str, float]:
    """``{"accuracy": ...}`` for logits ``[T, Q, ways]`` and labels ``[T, Q]``; ``{}`` for regression."""
    if targets.dtype.is_floating_point or outputs.dim() != targets.dim() + 1:
        return {}
    return {"accuracy": (outputs.argmax(-1) == targets).float().mean().item()}
