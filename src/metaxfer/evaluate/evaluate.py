"""Honest evaluation: mean accuracy ± 95% confidence interval over fixed episodes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from metaxfer.learners.base import Learner
from metaxfer.tasks.episode import Episode


@dataclass
class EvalResult:
    """Per-episode accuracies and their summary.

    ``ci95`` is the half-width ``1.96 * s / sqrt(n)`` with ``s`` the sample
    standard deviation (ddof=1) of per-episode accuracies; all in percent.
    """

    mean: float
    ci95: float
    std: float
    n: int
    ways: int
    shots: int
    queries: int
    transductive: bool
    seed: int | None = None
    fingerprint: str | None = None
    protocol: str | None = None
    accuracies: list[float] = field(default_factory=list, repr=False)

    def line(self) -> str:
        """The one-line report, e.g. ``accuracy: 98.80 ± 0.18 % (95% CI, 600 episodes, omniglot vinyals test, 5-way 1-shot)``."""
        where = f", {self.protocol}" if self.protocol else ""
        mode = ", transductive" if self.transductive else ""
        return (f"accuracy: {self.mean:.2f} ± {self.ci95:.2f} % (95% CI, {self.n} episodes{where}, "
                f"{self.ways}-way {self.shots}-shot{mode})")

    def __str__(self) -> str:
        return self.line()

    def to_dict(self, with_accuracies: bool = False) -> dict[str, Any]:
        """JSON-ready record (per-episode accuracies only when asked)."""
        record = asdict(self)
        if not with_accuracies:
            record.pop("accuracies")
        return record


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, 95% CI half-width (1.96·s/√n, normal approximation) and sample std of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise: evaluate on at least one episode")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * std / math.sqrt(n), std


def episode_accuracy(learner: Learner, episode: Episode) -> float:
    """Query accuracy (0–1) of ``learner`` adapted to one unbatched ``episode``."""
    predictor = learner.adapt(episode.support_x, episode.support_y)
    with torch.no_grad():
        logits = predictor(episode.query_x)
    return (logits.argmax(-1) == episode.query_y).float().mean().item()


def evaluate(
    learner: Learner,
    episodes: Iterable[Episode],
    *,
    device: torch.device | str | None = None,
    protocol: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``learner`` on a fixed set of episodes.

    Each episode is adapted to independently with ``learner.adapt`` (which never
    mutates the learner), so the order of episodes does not matter.

    Args:
        learner: any :class:`~metaxfer.learners.base.Learner`.
        episodes: unbatched episodes, typically ``sampler.fixed_episodes(600, seed=0)``
            (an :class:`~metaxfer.tasks.sampler.EpisodeSet`, whose seed and
            fingerprint are recorded).
        device: where to run; defaults to the learner's parameters' device.
        protocol: free text recorded with the result, e.g. ``"omniglot vinyals test"``.
        progress: show a progress bar.

    Returns:
        :class:`EvalResult` with mean ± 95% CI in percent.
    """
    if device is None:
        first = next(learner.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    iterator: Iterable[Episode] = episodes
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(episodes, desc="eval", leave=False)
    accs: list[float] = []
    ways = shots = queries = 0
    for episode in iterator:
        if episode.is_batched:
            raise ValueError("evaluate expects unbatched episodes (no task dimension); iterate EpisodeSet, not .batches()")
        ways = episode.ways
        shots = episode.support_y.numel() // max(ways, 1)
        queries = episode.query_y.numel() // max(ways, 1)
        accs.append(100.0 * episode_accuracy(learner, episode.to(device)))
    mean, ci, std = mean_ci95(accs)
    meta = episodes.describe() if hasattr(episodes, "describe") else {}
    return EvalResult(mean=mean, ci95=ci, std=std, n=len(accs), ways=ways, shots=shots, queries=queries,
                      transductive=bool(getattr(learner, "transductive", False)), seed=meta.get("seed"),
                      fingerprint=meta.get("fingerprint"), protocol=protocol, accuracies=accs)
