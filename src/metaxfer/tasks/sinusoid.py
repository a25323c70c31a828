"""Sinusoid regression tasks (Finn, Abbeel & Levine, ICML 2017, section 5.1).

Each task is a function ``y = A * sin(x - phi)`` with amplitude ``A`` uniform in
``[0.1, 5.0]`` and phase ``phi`` uniform in ``[0, pi]``; its support and query
points have ``x`` uniform in ``[-5, 5]``. A learner sees ``K`` support points
(``K = 5`` or ``10`` in the paper) and is scored by the mean squared error of
its predictions at the query points.

The task distribution lives in ``tasks/`` rather than ``data/``: it has no
examples, files or classes to index, it *is* an episode sampler (the same
interface as :class:`~metaxfer.tasks.sampler.EpisodeSampler`: ``sample_batch``,
``state_dict``/``load_state_dict``, ``fixed_episodes``), so :func:`metaxfer.fit`
and :func:`metaxfer.evaluate` use it unchanged. ``data/registry.py`` registers it
as the dataset ``"sinusoid"`` so a config can name it.

All randomness comes from the sampler's own :class:`torch.Generator`, seeded by
``seed`` and the split, never from Python's ``random`` or torch's global generator.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.tasks.episode import Episode

__all__ = ["SinusoidEpisodeSet", "SinusoidTasks"]

# Splits draw from disjoint generator streams (seed * 10 + offset), like the synthetic clusters.
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2, "trainval": 3}


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EpisodeError(f"{name} must be a positive integer, got {value!r}; set {name} to 1 or more")


def _check_range(name: str, value: Sequence[float], minimum: float | None = None) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{name} must be finite, got ({low}, {high})")
    if low > high:
        raise ConfigError(f"{name} range is reversed: got ({low}, {high}); give it as (low, high) = ({high}, {low})")
    if minimum is not None and low < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got low = {low}; raise the lower end of {name}")
    return low, high


class SinusoidTasks:
    """Seeded sampler of sinusoid regression tasks ``y = A sin(x - phi)`` (Finn et al. 2017, section 5.1).

    Args:
        shots: ``K``, support points per task (5 or 10 in the paper).
        queries: query points per task (the paper uses ``K`` in meta-training;
            more query points make the test MSE of a task less noisy).
        seed: seed of the sampler's own generator (combined with ``split``).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``; splits
            draw from disjoint generator streams of the same distribution.
        amplitude: ``(low, high)`` of the uniform amplitude, ``[0.1, 5.0]``.
        phase: ``(low, high)`` of the uniform phase in radians, ``[0, pi]``.
        x_range: ``(low, high)`` of the uniform inputs, ``[-5, 5]``.

    Shapes of ``sample_batch(T)``:
        ``support_x [T, K, 1]``, ``support_y [T, K, 1]``,
        ``query_x [T, Q, 1]``, ``query_y [T, Q, 1]``; all float32.

    Raises:
        EpisodeError: for ``shots`` or ``queries`` that are not positive integers.
        ConfigError: for a reversed or non-finite range, a negative amplitude
            or an unknown split.

    Example:
        >>> tasks = SinusoidTasks(shots=5, queries=10, seed=0)
        >>> batch = tasks.sample_batch(25)   # Episode with [25, 5, 1] / [25, 10, 1] tensors
        >>> batch.support_x.shape, batch.support_y.dtype
        (torch.Size([25, 5, 1]), torch.float32)
        >>> test = SinusoidTasks(shots=5, queries=100, split="test").fixed_episodes(600, seed=0)
    """

    ways = None  # regression: no classes

    def __init__(
        self,
        shots: int = 5,
        queries: int = 10,
        seed: int = 0,
        split: str = "train",
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
    ) -> None:
        _check_positive(shots=shots, queries=queries)
        if split not in SPLIT_OFFSETS:
            raise ConfigError(f"unknown sinusoid split {split!r}; choose one of {sorted(SPLIT_OFFSETS)}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.amplitude = _check_range("amplitude", amplitude, minimum=0.0)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x_range", x_range)
        self.shots, self.queries, self.seed, self.split = shots, queries, seed, split
        self.generator = torch.Generator().manual_seed(self._stream(seed))
        self.episodes_drawn = 0

    def _stream(self, seed: int) -> int:
        return seed * 10 + SPLIT_OFFSETS[self.split]

    # -- the dataset side: how a config builds samplers from it --------------------------------

    def episode_sampler(self, ways: int | None, shots: int, queries: int, seed: int) -> SinusoidTasks:
        """A sampler of the same distribution and split with these sizes (what :func:`metaxfer.build.build_sampler` calls).

        Raises:
            EpisodeError: when ``ways`` is not 1 or ``None``: regression tasks have no classes.
        """
        if ways not in (None, 1):
            raise EpisodeError(f"sinusoid regression tasks have no classes but ways={ways}; set train.ways=1 and eval.ways=1")
        return SinusoidTasks(shots, queries, seed, self.split, self.amplitude, self.phase, self.x_range)

    @property
    def dataset(self) -> SinusoidTasks:
        """The task distribution this sampler draws from (itself; mirrors ``EpisodeSampler.dataset``)."""
        return self

    def describe(self) -> dict[str, Any]:
        """What identifies this task distribution in a result record."""
        return {"dataset": "sinusoid", "split": self.split, "amplitude": list(self.amplitude),
                "phase": list(self.phase), "x_range": list(self.x_range)}

    # -- sampling ------------------------------------------------------------------------------

    def draw(self, tasks: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``tasks`` functions and their points: amplitudes ``[T]``, phases ``[T]``, inputs ``[T, K + Q, 1]``."""
        g = self.generator if generator is None else generator

        def uniform(shape: tuple[int, ...], low_high: tuple[float, float]) -> Tensor:
            low, high = low_high
            return low + (high - low) * torch.rand(shape, generator=g)

        amplitude = uniform((tasks,), self.amplitude)
        phase = uniform((tasks,), self.phase)
        x = uniform((tasks, self.shots + self.queries, 1), self.x_range)
        return amplitude, phase, x

    @staticmethod
    def function(amplitude: Tensor, phase: Tensor, x: Tensor) -> Tensor:
        """``A sin(x - phi)`` for ``amplitude``/``phase`` of shape ``[T]`` and ``x [T, N, 1]`` (or scalars and any ``x``)."""
        if amplitude.dim() == 1:
            amplitude, phase = amplitude[:, None, None], phase[:, None, None]
        return amplitude * torch.sin(x - phase)

    def episode_from_draw(self, amplitude: Tensor, phase: Tensor, x: Tensor) -> Episode:
        """The episode ``[T, ...]`` of drawn functions: the first ``K`` points are the support, the rest the query."""
        y = self.function(amplitude, phase, x)
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:])

    def sample(self) -> Episode:
        """One task without a task dimension: ``[K, 1]`` / ``[Q, 1]`` tensors."""
        return self.sample_batch(1).task(0)

    def sample_batch(self, tasks: int) -> Episode:
        """A meta-batch of ``tasks`` tasks stacked as ``[tasks, ...]`` tensors (see class docstring)."""
        _check_positive(tasks=tasks)
        self.episodes_drawn += tasks
        return self.episode_from_draw(*self.draw(tasks))

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def fixed_episodes(self, n: int = 600, seed: int = 0) -> SinusoidEpisodeSet:
        """A fixed set of ``n`` tasks drawn with a fresh generator seeded by ``seed`` (and the split).

        The set does not touch this sampler's own generator, so drawing it does
        not change the training stream; the same ``(n, seed, split, sizes)``
        give the same tasks on every machine.
        """
        _check_positive(n=n)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        g = torch.Generator().manual_seed(self._stream(seed))
        return SinusoidEpisodeSet(self, *self.draw(n, g), seed=seed)

    def state_dict(self) -> dict[str, Any]:
        """Generator state and position, for exact resume."""
        return {"generator": self.generator.get_state(), "episodes_drawn": self.episodes_drawn, "seed": self.seed,
                "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.generator.set_state(state["generator"])
        self.episodes_drawn = int(state["episodes_drawn"])

    def __repr__(self) -> str:
        return (f"SinusoidTasks(shots={self.shots}, queries={self.queries}, seed={self.seed}, split={self.split!r}, "
                f"amplitude={self.amplitude}, phase={self.phase}, x_range={self.x_range})")


class SinusoidEpisodeSet(Sequence[Episode]):
    """A fixed, indexable set of sinusoid tasks (the :class:`~metaxfer.tasks.sampler.EpisodeSet` interface).

    Stores each task's amplitude, phase and inputs, so :meth:`curve` can draw
    the true function of a task (for plots). ``fingerprint`` is a sha256 of
    those tensors: two machines that print the same fingerprint evaluated on
    exactly the same tasks.

    Attributes:
        amplitude: ``[n]``.
        phase: ``[n]``.
        x: ``[n, K + Q, 1]`` support then query inputs.
    """

    def __init__(self, sampler: SinusoidTasks, amplitude: Tensor, phase: Tensor, x: Tensor, seed: int) -> None:
        self.sampler = sampler
        self.amplitude, self.phase, self.x = amplitude, phase, x
        self.seed = seed

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Episode:  # type: ignore[override]
        if isinstance(i, slice):
            return SinusoidEpisodeSet(self.sampler, self.amplitude[i], self.phase[i], self.x[i], self.seed)  # type: ignore[return-value]
        if not -len(self) <= i < len(self):
            raise IndexError(f"task {i} out of range for a set of {len(self)} tasks")
        return self.sampler.episode_from_draw(self.amplitude[i : i + 1 or None], self.phase[i : i + 1 or None],
                                              self.x[i : i + 1 or None]).task(0)

    def batches(self, tasks: int) -> Iterator[Episode]:
        """Iterate in meta-batches of up to ``tasks`` tasks, stacked as ``[tasks, ...]``."""
        _check_positive(tasks=tasks)
        for start in range(0, len(self), tasks):
            end = start + tasks
            yield self.sampler.episode_from_draw(self.amplitude[start:end], self.phase[start:end], self.x[start:end])

    def curve(self, i: int, x: Tensor) -> Tensor:
        """The true function of task ``i`` at inputs ``x`` (any shape)."""
        return self.amplitude[i] * torch.sin(x - self.phase[i])

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the tasks' amplitudes, phases and inputs."""
        h = hashlib.sha256()
        for t in (self.amplitude, self.phase, self.x):
            h.update(t.to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What identifies this set in a result record."""
        s = self.sampler
        return {"episodes": len(self), "ways": None, "shots": s.shots, "queries": s.queries, "seed": self.seed,
                "fingerprint": self.fingerprint, "task": "sinusoid", "split": s.split}
