"""Data-parallel meta-training on 1 or N processes with ``torch.distributed`` (launched by ``torchrun``).

The same training command runs on one process or under
``torchrun --nproc_per_node N -m metaxfer train ...``: :func:`setup` reads the
environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group (``gloo`` on CPU,
``nccl`` on CUDA, one GPU per local rank). Without that environment every
helper here is a no-op, so :func:`metaxfer.fit` has one code path.

How a meta-iteration is split (see ``docs/distributed.md``):

* Every rank draws the *whole* meta-batch of ``tasks_per_step`` episodes from
  the same seeded sampler and keeps only its contiguous slice
  (:func:`task_slice`). The global meta-batch at step ``k`` is therefore the
  one a single process draws, whatever the number of processes, and every
  rank's sampler sits at the same position (rank 0's checkpoint resumes all).
* Each rank backpropagates the mean loss of its tasks; :func:`all_reduce_grads`
  then sums ``share * grad`` over ranks with ``share = local_tasks / tasks``,
  which is the gradient of the mean over all tasks: the single-process
  meta-gradient, up to float summation order.
* Why an explicit all-reduce and not ``DistributedDataParallel``: DDP
  registers autograd hooks on the wrapped module's parameters and expects the
  forward pass to go through the wrapper. The gradient learners run their
  inner loops as pure functions of parameter dicts
  (``torch.func.functional_call``/``grad``/``vmap``) and call the backbone
  outside any wrapper, so DDP's reducer would see either nothing or a
  "parameter used twice / not at all" graph. Reducing ``.grad`` after
  ``backward`` is exact for every learner, costs one collective per step
  (the whole gradient as one flat buffer), and equals what DDP would do.
* BatchNorm running statistics (used by ProtoNet's ``adapt`` in ``eval()``
  mode) are updated by each rank's own tasks; :class:`RunningStatsSync`
  recombines them into exactly the statistics a single process would have
  after the same tasks in the same order.
* Evaluation splits the fixed episodes into contiguous blocks
  (:func:`shard`) and gathers the per-episode scores in episode order, so
  mean, CI and ``n`` are the single-process figures bit for bit.

Example:
    >>> device = setup("cpu")          # joins the group under torchrun; returns this rank's device
    >>> if is_main():
    ...     print("rank 0 of", world_size())
    >>> teardown()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metaxfer.errors import ConfigError

__all__ = [
    "RunningStatsSync",
    "all_gather_objects",
    "all_reduce_grads",
    "all_reduce_mean_metrics",
    "barrier",
    "broadcast_module",
    "check_tasks_per_step",
    "is_distributed",
    "is_main",
    "rank",
    "setup",
    "shard",
    "task_slice",
    "teardown",
    "world_size",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun, "
                          f"which sets it, or unset it to train on one process") from None


def is_distributed() -> bool:
    """True when this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the process that logs, writes metrics and checkpoints (rank 0)."""
    return rank() == 0


def setup(device: torch.device | str = "cpu") -> torch.device:
    """Join the process group ``torchrun`` describes, once, and return this rank's device.

    With ``WORLD_SIZE`` unset or 1 (a plain ``python``/``metaxfer`` process)
    nothing happens and ``device`` is returned as given. Under ``torchrun``
    with several processes the group is initialised from the environment
    (``env://``) with backend ``nccl`` for a CUDA device, each local rank on
    its own GPU (``cuda`` -> ``cuda:LOCAL_RANK``), and ``gloo`` otherwise.
    Calling it again (e.g. the CLI, then :func:`metaxfer.fit`) returns the same
    device without re-initialising.

    Args:
        device: the configured device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Returns:
        The device this process trains on.

    Raises:
        ConfigError: when torch has no distributed support, or there are fewer
            GPUs than local processes.
    """
    device = torch.device(device)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda" and device.index is None and (_env_int("WORLD_SIZE", 1) > 1 or is_distributed()):
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPU(s); "
                              "run torchrun --nproc_per_node with at most one process per GPU")
        device = torch.device("cuda", local_rank)
    if dist.is_available() and dist.is_initialized():
        return device
    if _env_int("WORLD_SIZE", 1) <= 1:
        return device
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; train with one process (plain `metaxfer train`)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=_attempt_store(), rank=_env_int("RANK", 0),
                            world_size=_env_int("WORLD_SIZE", 1), **kwargs)
    logger.info("rank %d of %d joined the process group (%s) on %s", rank(), world_size(), dist.get_backend(), device)
    return device


def _attempt_store() -> dist.Store | None:
    """The rendezvous store for this attempt of an elastic job, or ``None`` to let ``env://`` build it.

    By default ``torchrun`` lets the workers share its own TCPStore, which
    outlives a restart (``--max-restarts``): the process-group keys the killed
    attempt wrote are still there, and a restarted rank can read a peer's
    stale address and fail with "Gloo connectFullMesh failed ... Connection
    refused" (or a wrong NCCL id; pytorch/pytorch#135712). Prefixing the keys
    with the restart count gives every attempt its own namespace. With
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` rank 0 hosts a fresh store per
    attempt and nothing needs doing. (On several nodes, an agent that joins
    after a node was replaced counts restarts from 0: set that variable there.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    from torch.distributed.constants import default_pg_timeout

    store = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT", 0), _env_int("WORLD_SIZE", 1),
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"metaxfer/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def teardown() -> None:
    """Leave the process group if this process is in one (call once, at the end of the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op on one process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_tasks_per_step(tasks_per_step: int, world: int) -> int:
    """Tasks each rank runs per step: ``tasks_per_step // world``.

    Raises:
        ConfigError: when ``tasks_per_step`` is not a multiple of ``world``
            (equal shares keep every rank's work and the meta-gradient's
            weights equal).
    """
    if tasks_per_step % world:
        lower = max(world, tasks_per_step // world * world)
        divisors = [n for n in range(1, world) if tasks_per_step % n == 0]
        raise ConfigError(
            f"train.tasks_per_step={tasks_per_step} cannot be split evenly over {world} processes; set "
            f"train.tasks_per_step to a multiple of {world} (e.g. {lower} or {lower + world}), or launch "
            f"torchrun --nproc_per_node with a divisor of {tasks_per_step} (e.g. {divisors[-1]})"
        )
    return tasks_per_step // world


def task_slice(tasks_per_step: int) -> slice:
    """This rank's contiguous share of a meta-batch of ``tasks_per_step`` tasks (all of it on one process).

    Raises:
        ConfigError: see :func:`check_tasks_per_step`.
    """
    local = check_tasks_per_step(tasks_per_step, world_size())
    start = rank() * local
    return slice(start, start + local)


def shard(n: int) -> range:
    """This rank's contiguous block of ``n`` items (evaluation episodes); blocks differ by at most one item."""
    w, r = world_size(), rank()
    return range(r * n // w, (r + 1) * n // w)


def all_reduce_grads(parameters: Iterable[nn.Parameter], share: float) -> None:
    """Replace every ``.grad`` by the sum over ranks of ``share * grad`` (one collective).

    Each rank holds the gradient of the mean loss over its own tasks; with
    ``share = local_tasks / tasks_per_step`` the sum is the gradient of the
    mean over all tasks of the meta-batch. All gradients travel as one flat
    buffer, plus one presence flag per parameter, so a parameter whose
    gradient is ``None`` on every rank keeps ``None`` (the optimiser then skips
    it exactly as on one process).

    Args:
        parameters: the learner's parameters (same order on every rank).
        share: this rank's fraction of the meta-batch's tasks.
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    dtype = _wire_dtype(params)
    pieces = [p.grad.detach() * share if p.grad is not None else torch.zeros(p.numel(), dtype=dtype) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype)
    *sums, flags = _sum_over_ranks([*pieces, present], dtype)
    for p, flag, summed in zip(params, flags.tolist(), sums):
        if flag > 0:
            reduced = summed.view_as(p).to(p.device, p.dtype)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)


def all_reduce_weighted_mean(tensors: Sequence[Tensor], weight: float) -> list[Tensor]:
    """The mean over ranks of each tensor, weighted: ``sum_r w_r x_r / sum_r w_r``, in one collective.

    For state that each rank averages over its own tasks and that must be the
    mean over all tasks of the meta-batch, e.g. Reptile's persistent inner Adam
    moments (``weight`` = this rank's number of tasks). All tensors travel as
    one flat buffer with the weight appended.

    Args:
        tensors: this rank's tensors (same shapes and order on every rank).
        weight: this rank's weight (> 0 on at least one rank).

    Returns:
        New tensors of the inputs' shapes, dtypes and devices, the same on every
        rank; detached copies of ``tensors`` on one process.
    """
    if not is_distributed():
        return [t.detach().clone() for t in tensors]
    if not tensors:
        return []
    dtype = _wire_dtype(tensors)
    *sums, total = _sum_over_ranks([*(t.detach().to(dtype) * weight for t in tensors),
                                    torch.tensor([weight], dtype=dtype)], dtype)
    return [(summed / total).view_as(t).to(t.device, t.dtype) for summed, t in zip(sums, tensors)]


def _wire_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The tensors' common dtype, or float64 when they differ (one flat buffer has one dtype)."""
    return tensors[0].dtype if all(t.dtype == tensors[0].dtype for t in tensors) else torch.float64


def _sum_over_ranks(pieces: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Each tensor's sum over ranks, all in one collective: flat ``[numel]`` tensors on the communication device."""
    flat = torch.cat([p.detach().reshape(-1).to(_comm_device(), dtype) for p in pieces])
    dist.all_reduce(flat)
    return list(flat.split([p.numel() for p in pieces]))


def all_reduce_mean_metrics(loss: Tensor, metrics: dict[str, float], share: float,
                            keys: Sequence[str] = ("accuracy", "mse")) -> tuple[Tensor, dict[str, float]]:
    """The meta-batch's mean loss and metrics from every rank's mean over its own tasks.

    A non-finite loss on any rank makes the result non-finite on every rank,
    so all ranks skip (or stop at) the same step. A metric in ``keys`` is kept
    only when every rank reported it.

    Args:
        loss: this rank's mean loss (scalar).
        metrics: this rank's ``last_metrics`` (means over its tasks).
        share: this rank's fraction of the meta-batch's tasks.
        keys: the metrics to reduce (a fixed list, so every rank sends the same tensor).

    Returns:
        ``(loss, metrics)`` over the whole meta-batch, the same on every rank.
    """
    if not is_distributed():
        return loss, metrics
    values = [float(loss) * share]
    for key in keys:
        values += [float(metrics[key]) * share if key in metrics else 0.0, 1.0 if key in metrics else 0.0]
    packed = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(packed)
    out = packed.tolist()
    world = world_size()
    reduced = {key: out[1 + 2 * i] for i, key in enumerate(keys) if round(out[2 + 2 * i]) == world}
    return torch.tensor(out[0], dtype=loss.dtype), reduced


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (identical start, whatever each rank's seed)."""
    if not is_distributed():
        return
    device = _comm_device()
    for t in [*module.parameters(), *module.buffers()]:
        data = t.detach().to(device).clone()
        dist.broadcast(data, src=0)
        with torch.no_grad():
            t.copy_(data.to(t.device))


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _running_stat_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None and m.num_batches_tracked is not None]


class RunningStatsSync:
    """Make BatchNorm running statistics what one process would have after the whole meta-batch.

    On one process the tasks of a meta-batch update a BatchNorm layer's
    running statistics one forward pass after another:
    ``r <- a * r + (1 - a) * s`` with ``a = 1 - momentum``. Rank ``k`` starts
    from the same ``r0`` and applies only its own ``n_k`` updates, ending at
    ``r_k = a**n_k * r0 + d_k``. Since rank ``k``'s tasks come before rank
    ``k+1``'s in the single-process order, that process ends at
    ``a**N * r0 + sum_k a**(n_{k+1} + ... + n_{W-1}) * d_k`` with ``N = sum n_k``,
    which this class computes with two small all-reduces
    (cumulative averages, ``momentum=None``, are recombined likewise). Learners
    that never update running statistics (MAML and co. hide them) cost one
    all-reduce of the update counts.

    Example:
        >>> sync = RunningStatsSync(learner)
        >>> sync.snapshot()   # before the forward passes of a step
        >>> ...               # forward/backward on this rank's tasks
        >>> sync.merge()      # every rank now holds the single-process statistics
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = _running_stat_modules(module)
        self._before: list[tuple[Tensor, Tensor, int]] = []

    def snapshot(self) -> None:
        """Remember each layer's statistics and update count before this step's forward passes."""
        if is_distributed():
            self._before = [(m.running_mean.detach().clone(), m.running_var.detach().clone(), int(m.num_batches_tracked))
                            for m in self.layers]

    def merge(self) -> None:
        """Recombine the ranks' statistics (same result on every rank)."""
        if not is_distributed() or not self.layers:
            return
        w, r = world_size(), rank()
        counts = torch.zeros(w, len(self.layers), dtype=torch.float64, device=_comm_device())
        counts[r] = torch.tensor([int(m.num_batches_tracked) - n0 for m, (_, _, n0) in zip(self.layers, self._before)],
                                 dtype=torch.float64)
        dist.all_reduce(counts)
        counts_cpu = counts.cpu()
        if not bool(counts_cpu.any()):
            return  # no rank updated any running statistic this step
        contributions, finals = [], []
        for i, (m, (mean0, var0, n0)) in enumerate(zip(self.layers, self._before)):
            n = counts_cpu[:, i]
            total, mine, later = float(n.sum()), float(n[r]), float(n[r + 1:].sum())
            if m.momentum is None:  # cumulative average over n0 + total updates
                scale_r0, weight = n0 / (n0 + total), 1.0 / (n0 + total)
                parts = [((n0 + mine) * now.double() - n0 * old.double()) * weight
                         for now, old in ((m.running_mean, mean0), (m.running_var, var0))]
            else:
                a = 1.0 - float(m.momentum)
                scale_r0, weight = a ** total, a ** later
                parts = [(now.double() - a ** mine * old.double()) * weight
                         for now, old in ((m.running_mean, mean0), (m.running_var, var0))]
            contributions += parts
            finals.append((m, mean0, var0, n0, total, scale_r0))
        sums = iter(_sum_over_ranks(contributions, torch.float64))
        for m, mean0, var0, n0, total, scale_r0 in finals:
            with torch.no_grad():
                for stat, old in ((m.running_mean, mean0), (m.running_var, var0)):
                    merged = scale_r0 * old.double() + next(sums).to(old.device).view_as(old)
                    stat.copy_(merged.to(stat.device, stat.dtype))
                m.num_batches_tracked.fill_(n0 + int(total))
