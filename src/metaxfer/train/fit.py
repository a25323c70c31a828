"""The one training loop: meta-batches, validation, checkpoints, exact resume, metrics."""

from __future__ import annotations

import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaxfer.atomic import atomic_write_dir
from metaxfer.errors import ConfigError, NonFiniteLossError
from metaxfer.evaluate.evaluate import EvalResult, evaluate
from metaxfer.hub import load_weights, write_learner
from metaxfer.learners.base import Learner
from metaxfer.tasks.episode import Episode
from metaxfer.tasks.sampler import EpisodeSampler, EpisodeSet
from metaxfer.train import distributed
from metaxfer.train.checkpoints import Checkpoints
from metaxfer.train.metrics import MetricsLog, plot_learning_curve
from metaxfer.train.state import save_state

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: EvalResult | None = None
    best_step: int | None = None
    run_dir: Path | None = None
    seconds: float = 0.0
    skipped_steps: list[int] = field(default_factory=list)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Scheduler state that says where a schedule is, not what it is.
_SCHEDULE_POSITION = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "lr_lambdas")


def _continue_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    configured_lrs: list[float],
    configured: dict[str, Any] | None,
    saved: dict[str, Any] | None,
) -> None:
    """Continue the learning rate at the checkpoint's step under the schedule *as configured now*.

    The optimiser's saved state holds the old run's learning rate and ``StepLR``'s
    saved state its old step size and factor, so loading them as they are would
    silently ignore a changed ``lr``, ``lr_decay`` or ``lr_decay_every`` (e.g. a run
    extended with a new decay interval). When the configuration is unchanged, the
    saved state is loaded untouched (bit-identical resume); when it changed, the
    schedule keeps only its position and the rates are set to the new schedule's
    closed-form values at that step.
    """
    if scheduler is None:
        for group, lr in zip(optimizer.param_groups, configured_lrs):
            if group["lr"] != lr:
                logger.info("resume: learning rate %g from the configuration replaces the checkpoint's %g", lr, group["lr"])
                group["lr"] = lr
        return
    if saved is None:
        return
    assert configured is not None

    def definition(state: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if k not in _SCHEDULE_POSITION}

    if definition(saved) == definition(configured):
        scheduler.load_state_dict(saved)
        return
    logger.info("resume: the learning-rate schedule changed (%s -> %s); continuing the new one at step %d",
                definition(saved), definition(configured), saved["last_epoch"])
    scheduler.load_state_dict({**configured, "last_epoch": saved["last_epoch"], "_step_count": saved.get("_step_count", 1)})
    closed_form = getattr(scheduler, "_get_closed_form_lr", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr() outside step() warns; LambdaLR's is closed-form anyway
        lrs = closed_form() if closed_form is not None else scheduler.get_lr()
    for group, base, lr in zip(optimizer.param_groups, scheduler.base_lrs, lrs):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = list(lrs)  # what get_last_lr() reports


def forward_backward(learner: Learner, batch: Episode, tasks_per_backward: int | None = None) -> tuple[Tensor, str, dict[str, float]]:
    """``learner.loss(batch).backward()``, optionally in chunks of tasks (gradient accumulation).

    With ``tasks_per_backward = c`` the meta-batch of ``T`` tasks is split into
    chunks of at most ``c`` tasks; each chunk's mean loss, weighted by its share
    of the tasks, is backpropagated before the next chunk runs. The summed
    gradient equals that of the mean over all ``T`` tasks, while only one
    chunk's graph is alive at a time: peak memory is that of ``c`` tasks
    (second-order MAML keeps every task's activations and inner-loop graph
    until ``backward``).

    Args:
        learner: computes ``loss(batch)`` on an episode with ``[T, ...]`` tensors.
        batch: the meta-batch.
        tasks_per_backward: tasks per chunk; ``None`` does one pass.

    Returns:
        ``(loss, detail, metrics)``: the detached mean loss over the tasks (NaN
        if a chunk's loss was not finite, in which case no further chunk runs
        and the caller must discard the gradients), the learner's own message
        when it raised :class:`NonFiniteLossError` (else ``""``), and the
        learner's ``last_metrics`` averaged over chunks, weighted by tasks.
    """
    tasks = batch.num_tasks
    chunk = tasks if not tasks_per_backward else min(tasks_per_backward, tasks)
    total = torch.zeros(())
    sums: dict[str, float] = {}
    for start in range(0, tasks, chunk):
        part = batch if chunk == tasks else Episode(*(t[start:start + chunk] for t in batch))
        share = part.num_tasks / tasks
        try:
            loss = learner.loss(part)
        except NonFiniteLossError as e:  # raised inside the learner, e.g. by an inner loop (names task and step)
            offset = f" (tasks {start}..{start + part.num_tasks - 1} of the meta-batch)" if chunk < tasks else ""
            return torch.tensor(float("nan")), f" ({e}{offset})", {}
        if not torch.isfinite(loss):
            return loss.detach().cpu(), "", {}
        (loss * share).backward()
        total = total + loss.detach().cpu() * share
        for key, value in (getattr(learner, "last_metrics", None) or {}).items():
            sums[key] = sums.get(key, 0.0) + float(value) * share
    return total, "", sums


def fit(
    learner: Learner,
    sampler: EpisodeSampler,
    optimizer: torch.optim.Optimizer,
    steps: int,
    tasks_per_step: int = 1,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    val_episodes: EpisodeSet | None = None,
    val_every: int = 500,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    grad_clip: float | None = None,
    on_nonfinite: str = "stop",
    device: torch.device | str = "cpu",
    log_every: int = 10,
    progress: bool | None = None,
    extra_config: dict[str, Any] | None = None,
    tasks_per_backward: int | None = None,
) -> FitResult:
    """Meta-train ``learner`` on episodes from ``sampler``.

    Each step draws a meta-batch of ``tasks_per_step`` episodes (``[T, ...]``
    tensors), calls ``learner.loss(batch)``, backpropagates and steps the
    optimiser (and scheduler).

    With a ``run_dir``, every ``checkpoint_every`` steps (and at the end) a
    checkpoint is written atomically: weights, optimiser, scheduler, every RNG
    and the sampler position; ``resume=True`` continues from the latest one and
    gives exactly the losses an uninterrupted run gives. Validation on the
    fixed ``val_episodes`` every ``val_every`` steps keeps the best checkpoint
    (highest accuracy, or lowest mean squared error for regression tasks).
    Metrics go to ``metrics.jsonl`` / ``metrics.csv``, and a learning curve to
    ``curve.png`` (with matplotlib installed).

    Under ``torchrun`` with several processes (see
    :mod:`metaxfer.train.distributed` and ``docs/distributed.md``) the same
    call trains data-parallel: every rank draws the whole meta-batch from its
    identically seeded sampler and runs its contiguous share of the tasks,
    the meta-gradients are all-reduced (weighted so the sum is the mean over
    all tasks), validation episodes are split across ranks and gathered, and
    only rank 0 logs and writes metrics and checkpoints. The episodes, and so
    the result, are those of a single-process run, up to float summation order.

    Args:
        learner: the learner to train (moved to ``device``).
        sampler: training episodes.
        optimizer: over ``learner.parameters()``.
        steps: total number of steps (a resumed run continues up to it).
        tasks_per_step: tasks per meta-batch.
        scheduler: stepped once per step.
        val_episodes: fixed validation episodes (e.g. ``val_sampler.fixed_episodes(200)``).
        val_every: validate every this many steps.
        run_dir: where checkpoints and metrics go; ``None`` keeps nothing on disk.
        checkpoint_every: checkpoint every this many steps.
        resume: continue from ``run_dir``'s latest checkpoint if there is one;
            ``False`` deletes the run's previous checkpoints and starts over.
        grad_clip: clip the global gradient norm to this value.
        on_nonfinite: ``"stop"`` raises :class:`NonFiniteLossError` naming the
            step (the last good checkpoint stays); ``"skip"`` drops the step
            with a warning.
        device: where to train.
        log_every: record training metrics every this many steps.
        progress: progress bar; default: only when stderr is a terminal.
        extra_config: JSON-ready fields stored in each checkpoint's ``config.json``.
        tasks_per_backward: backpropagate the meta-batch in chunks of this many
            tasks (same gradient, peak memory of one chunk; see
            :func:`forward_backward`); ``None`` does one pass.

    Returns:
        :class:`FitResult` with the metric history and best validation result.

    Raises:
        NonFiniteLossError: on a NaN/inf loss when ``on_nonfinite="stop"``.
        ConfigError: for invalid settings, e.g. ``tasks_per_step`` not a multiple
            of the number of processes.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    if steps < 0:
        raise ConfigError(f"steps (train.steps) must be >= 0, got {steps}")
    counts = {"tasks_per_step": tasks_per_step, "val_every": val_every, "checkpoint_every": checkpoint_every,
              "log_every": log_every}
    bad = {k: v for k, v in counts.items() if v <= 0}
    if bad:
        # The first three are train.* keys of the CLI's config; log_every is fit's own argument.
        raise ConfigError(f"{', '.join(f'{k} must be > 0, got {v}' for k, v in bad.items())} (train.* in a config)")
    if tasks_per_backward is not None and tasks_per_backward <= 0:
        raise ConfigError(f"tasks_per_backward must be a positive number of tasks or None, got {tasks_per_backward}")
    device = distributed.setup(device)  # joins the process group under torchrun; a no-op on one process
    world, main = distributed.world_size(), distributed.is_main()
    share_slice = distributed.task_slice(tasks_per_step)  # ConfigError unless the tasks split evenly
    share = (share_slice.stop - share_slice.start) / tasks_per_step
    learner.to(device)
    run_path = Path(run_dir) if run_dir is not None else None
    ckpts = Checkpoints(run_path) if run_path is not None else None
    # best_score is higher-is-better: the validation accuracy, or minus the validation MSE for regression.
    start, best_score, best_step, elapsed_before = 0, -math.inf, None, 0.0
    best_val: EvalResult | None = None
    if ckpts is not None and not resume and ckpts.root.exists() and main:
        # A fresh start must not leave pointers to the old run's checkpoints behind.
        logger.warning("resume=False: removing the previous checkpoints in %s", ckpts.root)
        shutil.rmtree(ckpts.root)
    distributed.barrier()  # rank 0 has finished deleting; nobody writes until every rank has read below
    if ckpts is not None and resume:
        found = ckpts.latest_state()
        if found is not None:
            directory, state = found
            load_weights(learner, directory / "model.safetensors")
            configured_lrs = [group["lr"] for group in optimizer.param_groups]
            configured_schedule = scheduler.state_dict() if scheduler is not None else None
            optimizer.load_state_dict(state["optimizer"])
            _continue_schedule(optimizer, scheduler, configured_lrs, configured_schedule, state.get("scheduler"))
            sampler.load_state_dict(state["sampler"])  # every rank continues the same episode stream
            per_rank = state.get("rng_ranks")
            # Each rank continues its own RNG stream (dropout) when the world size is unchanged.
            _set_rng_state(per_rank[distributed.rank()] if per_rank and len(per_rank) == world else state["rng"])
            start = int(state["step"])
            # Checkpoints from before regression support store the best accuracy as "best_acc".
            saved = state.get("best_score", state.get("best_acc"))
            best_score = saved if saved is not None else -math.inf
            best_step = state["best_step"]
            elapsed_before = float(state.get("seconds", 0.0))
            if main:
                logger.info("resumed from %s at step %d", directory, start)
    # Every rank starts from rank 0's weights and buffers, whatever seed each process was given.
    distributed.broadcast_module(learner)
    running_stats = distributed.RunningStatsSync(learner)
    if run_path is not None and main:
        run_path.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_path, resume_step=start) if run_path is not None and main else None
    history = list(log.records) if log is not None else []

    def checkpoint(step: int, is_best: bool) -> None:
        assert ckpts is not None
        rngs = distributed.all_gather_objects(_rng_state())  # a collective: every rank takes part
        if not main:
            distributed.barrier()  # wait for rank 0's write, so a rank never runs ahead of the checkpoint
            return
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "sampler": sampler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs if world > 1 else None,
            "best_score": None if best_score == -math.inf else best_score,
            "best_step": best_step,
            "seconds": elapsed(),
        }
        directory = ckpts.root / Checkpoints.name(step)

        def fill(tmp: Path) -> None:
            write_learner(learner, tmp, {"trained_steps": step, **(extra_config or {})})
            save_state(tmp, "trainer", state)

        atomic_write_dir(directory, fill)
        ckpts.point("latest", directory)
        if is_best:
            ckpts.point("best", directory)
        ckpts.prune()
        distributed.barrier()

    def elapsed() -> float:
        # Training time summed over resumed segments, so time-to-accuracy survives restarts.
        return round(elapsed_before + time.perf_counter() - t0, 3)

    show = (progress if progress is not None else sys.stderr.isatty()) and main
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, disable=not show, desc="train", dynamic_ncols=True)
    skipped: list[int] = []
    t0 = time.perf_counter()
    step = start
    try:
        for step in range(start + 1, steps + 1):
            learner.train()
            batch = sampler.sample_batch(tasks_per_step)
            if world > 1:
                # Every rank draws the whole meta-batch (the same one a single process draws, and
                # every sampler stays at the same position) and runs only its own tasks.
                batch = Episode(*(t[share_slice] for t in batch))
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            running_stats.snapshot()
            loss, detail, metrics = forward_backward(learner, batch, tasks_per_backward)
            if world > 1:
                loss, metrics = distributed.all_reduce_mean_metrics(loss, metrics, share)
                running_stats.merge()
                if torch.isfinite(loss):  # the same decision on every rank: the loss was reduced
                    distributed.all_reduce_grads(learner.parameters(), share)
            if not torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)  # drop what earlier chunks accumulated
                if on_nonfinite == "stop":
                    where = f"; the last good checkpoint is {ckpts.pointer('latest')}" if ckpts and ckpts.pointer("latest") else ""
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {step}{detail}{where}. Lower the learning rate or set "
                        "train.grad_clip, or pass on_nonfinite='skip' to drop such steps"
                    )
                warnings.warn(f"non-finite loss {loss.item()} at step {step}{detail}; step skipped", RuntimeWarning,
                              stacklevel=2)
                skipped.append(step)
            else:
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(learner.parameters(), grad_clip)
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            record: dict[str, Any] | None = None
            if step % log_every == 0 or step == steps:
                record = {"step": step, "loss": loss.item(), "accuracy": metrics.get("accuracy"),
                          "lr": optimizer.param_groups[0]["lr"], "seconds": elapsed()}
                if "mse" in metrics:  # regression learners report the query MSE after adaptation
                    record["mse"] = metrics["mse"]
                bar.set_postfix(loss=f"{loss.item():.4f}")
            is_best = False
            if val_episodes is not None and (step % val_every == 0 or step == steps):
                result = evaluate(learner, val_episodes, device=device, distributed=True)
                record = record or {"step": step, "loss": None, "accuracy": None,
                                    "lr": optimizer.param_groups[0]["lr"], "seconds": elapsed()}
                record.update({f"val_{result.metric}": result.mean, "val_ci95": result.ci95})
                if main:
                    logger.info("step %d: validation %s", step, result.line())
                if result.score() > best_score:  # accuracy: higher; MSE: lower
                    best_score, best_step, best_val, is_best = result.score(), step, result, True
            if record is not None:
                history.append(record)
                if log is not None:
                    log.append(record)
            if ckpts is not None and (step % checkpoint_every == 0 or step == steps or is_best):
                checkpoint(step, is_best)
            bar.update(1)
    finally:
        bar.close()
        if run_path is not None and history and main:
            plot_learning_curve(history, run_path / "curve.png")
    return FitResult(steps=step, history=history, best_val=best_val, best_step=best_step, run_dir=run_path,
                     seconds=time.perf_counter() - t0, skipped_steps=skipped)
