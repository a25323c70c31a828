"""Honest evaluation: mean accuracy (classification) or mean squared error (regression) ± 95% CI over fixed episodes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from metaxfer.learners.base import Learner
from metaxfer.tasks.episode import Episode

METRICS = ("accuracy", "mse")


@dataclass
class EvalResult:
    """Per-episode scores and their summary.

    ``metric`` says what was measured: ``"accuracy"`` (classification, in
    percent, higher is better) or ``"mse"`` (regression with floating-point
    targets: each episode's mean squared error over its query points, lower is
    better). ``ci95`` is the half-width ``1.96 * s / sqrt(n)`` with ``s`` the
    sample standard deviation (ddof=1) of the per-episode scores.

    For regression ``ways`` is ``None``, ``shots`` is the number of support
    points ``K`` and ``adapt_steps`` the learner's test-time gradient steps
    (when it has them). ``query_batches`` records how the queries were batched
    (see :func:`evaluate`).
    """

    mean: float
    ci95: float
    std: float
    n: int
    ways: int | None
    shots: int
    queries: int
    transductive: bool
    seed: int | None = None
    fingerprint: str | None = None
    protocol: str | None = None
    accuracies: list[float] = field(default_factory=list, repr=False)
    metric: str = "accuracy"
    adapt_steps: int | None = None
    mses: list[float] = field(default_factory=list, repr=False)
    query_batches: str = "all"

    @property
    def higher_is_better(self) -> bool:
        """True for accuracy, False for mean squared error (what picks the best checkpoint)."""
        return self.metric != "mse"

    def score(self) -> float:
        """A number that is larger for a better result: the accuracy, or minus the MSE."""
        return self.mean if self.higher_is_better else -self.mean

    def line(self) -> str:
        """The one-line report.

        E.g. ``accuracy: 98.80 ± 0.18 % (95% CI, 600 episodes, omniglot vinyals test, 5-way 1-shot)`` or
        ``mse: 0.352 ± 0.031 (95% CI, 600 tasks, sinusoid test, K=5, 10 steps)``.
        """
        where = f", {self.protocol}" if self.protocol else ""
        mode = ", transductive" if self.transductive else ""
        if self.query_batches == "one_per_class":
            mode += ", one query per class per batch"
        if self.metric == "mse":
            steps = "" if self.adapt_steps is None else f", {self.adapt_steps} step{'s' if self.adapt_steps != 1 else ''}"
            return f"mse: {self.mean:.3f} ± {self.ci95:.3f} (95% CI, {self.n} tasks{where}, K={self.shots}{steps}{mode})"
        return (f"accuracy: {self.mean:.2f} ± {self.ci95:.2f} % (95% CI, {self.n} episodes{where}, "
                f"{self.ways}-way {self.shots}-shot{mode})")

    def __str__(self) -> str:
        return self.line()

    def to_dict(self, with_accuracies: bool = False) -> dict[str, Any]:
        """JSON-ready record (per-episode accuracies or MSEs only when asked)."""
        record = asdict(self)
        if not with_accuracies:
            record.pop("accuracies")
            record.pop("mses")
        return record


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean, 95% CI half-width (1.96·s/√n, normal approximation) and sample std of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to summarise: evaluate on at least one episode")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * std / math.sqrt(n), std


QUERY_BATCHES = ("all", "one_per_class")


def one_query_per_class(query_y: torch.Tensor) -> torch.Tensor:
    """Indices ``[G, ways]`` that split a query set into ``G`` batches holding one query of every class.

    The test batches of the reference MAML (Finn et al. 2017) and Reptile (Nichol et al. 2018) code: with
    transductive BatchNorm, each batch of ``ways`` queries is normalised with its own statistics, like the
    ``ways``-image support set of a 1-shot task. Batch ``g`` takes the ``g``-th query of each class.

    Args:
        query_y: ``[Q]`` labels ``0 .. ways-1``, the same number ``G`` of each.

    Raises:
        ValueError: when the classes have different numbers of queries.
    """
    ways = int(query_y.max().item()) + 1
    counts = torch.bincount(query_y, minlength=ways)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"one query per class per batch needs the same number of queries in every class, got "
                         f"{counts.tolist()}")
    order = torch.argsort(query_y, stable=True)  # class-major
    return order.view(ways, int(counts[0])).T


def episode_accuracy(learner: Learner, episode: Episode, query_batches: str = "all") -> float:
    """Query accuracy (0–1) of ``learner`` adapted to one unbatched ``episode``.

    ``query_batches="all"`` predicts the whole query set at once; ``"one_per_class"`` in the batches of
    :func:`one_query_per_class` (which only matters for transductive prediction, where a batch's
    statistics normalise its own queries).
    """
    predictor = learner.adapt(episode.support_x, episode.support_y)
    with torch.no_grad():
        if query_batches == "all":
            return (predictor(episode.query_x).argmax(-1) == episode.query_y).float().mean().item()
        correct = [predictor(episode.query_x[idx]).argmax(-1) == episode.query_y[idx]
                   for idx in one_query_per_class(episode.query_y)]
    return torch.cat(correct).float().mean().item()


def episode_mse(learner: Learner, episode: Episode) -> float:
    """Mean squared error over the query points of ``learner`` adapted to one unbatched regression ``episode``.

    ``episode.query_y`` is ``[Q, out]`` (floating point); the predictor must return the same shape.
    """
    predictor = learner.adapt(episode.support_x, episode.support_y)
    with torch.no_grad():
        pred = predictor(episode.query_x)
    if pred.shape != episode.query_y.shape:
        # A silent broadcast ([Q, 1] against [Q]) would average the wrong differences.
        raise ValueError(f"predictions have shape {tuple(pred.shape)} but targets {tuple(episode.query_y.shape)}; "
                         "give the model one output per target dimension")
    return torch.mean((pred.float() - episode.query_y.float()) ** 2).item()


def evaluate(
    learner: Learner,
    episodes: Iterable[Episode],
    *,
    device: torch.device | str | None = None,
    protocol: str | None = None,
    progress: bool = False,
    distributed: bool = False,
    query_batches: str = "all",
) -> EvalResult:
    """Evaluate ``learner`` on a fixed set of episodes.

    Each episode is adapted to independently with ``learner.adapt`` (which never
    mutates the learner), so the order of episodes does not matter.

    Classification episodes (integer labels) are scored by query accuracy in
    percent; regression episodes (floating-point targets, e.g. sinusoids,
    Finn et al. 2017 section 5.1) by the mean squared error over the query
    points, averaged over episodes (``result.metric`` says which).

    Args:
        learner: any :class:`~metaxfer.learners.base.Learner`.
        episodes: unbatched episodes, typically ``sampler.fixed_episodes(600, seed=0)``
            (an :class:`~metaxfer.tasks.sampler.EpisodeSet` or
            :class:`~metaxfer.tasks.sinusoid.SinusoidEpisodeSet`, whose seed and
            fingerprint are recorded).
        device: where to run; defaults to the learner's parameters' device.
        protocol: free text recorded with the result, e.g. ``"omniglot vinyals test"``.
        progress: show a progress bar.
        distributed: under ``torchrun`` with several processes, split the
            episodes into one contiguous block per rank and gather the
            per-episode scores in episode order, so every rank returns exactly
            the single-process result (mean, CI, ``n``). Every rank must call
            it with the same episodes (a sequence: it is indexed). Without a
            process group it changes nothing.
        query_batches: ``"all"`` (the query set in one batch) or ``"one_per_class"``
            (batches of one query per class, :func:`one_query_per_class`: the test
            batches of the reference MAML and Reptile code, whose transductive
            figures the papers report). Only transductive predictions depend on it.

    Returns:
        :class:`EvalResult` with mean ± 95% CI (accuracy in percent, or MSE).

    Raises:
        ValueError: for batched episodes, episodes that mix classification and regression, an unknown
            ``query_batches``, or ``"one_per_class"`` on regression episodes or unequal class counts.
    """
    if query_batches not in QUERY_BATCHES:
        raise ValueError(f"query_batches must be one of {QUERY_BATCHES}, got {query_batches!r}")
    if device is None:
        first = next(learner.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    iterator: Iterable[Episode] = episodes
    split = False
    if distributed:
        # Imported here: metaxfer.train imports this module (fit validates with evaluate).
        from metaxfer.train import distributed as dist_helpers

        split = dist_helpers.is_distributed()
        if split:
            if not isinstance(episodes, Sequence):
                raise ValueError("distributed evaluation indexes the episodes: pass a sequence such as "
                                 "sampler.fixed_episodes(n), not an iterator")
            progress = progress and dist_helpers.is_main()
            iterator = [episodes[i] for i in dist_helpers.shard(len(episodes))]
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="eval", leave=False)
    scores: list[float] = []
    ways: int | None = 0
    shots = queries = 0
    metric: str | None = None
    for episode in iterator:
        if episode.is_batched:
            raise ValueError("evaluate expects unbatched episodes (no task dimension); iterate EpisodeSet, not .batches()")
        this = "mse" if episode.support_y.is_floating_point() else "accuracy"
        if metric is not None and this != metric:
            raise ValueError("the episodes mix classification (integer labels) and regression (float targets); "
                             "evaluate them separately")
        metric = this
        if metric == "mse":
            if query_batches != "all":
                raise ValueError("query_batches='one_per_class' needs classification episodes (regression has no classes)")
            ways, shots, queries = None, episode.support_y.shape[0], episode.query_y.shape[0]
            scores.append(episode_mse(learner, episode.to(device)))
        else:
            ways = episode.ways
            shots = episode.support_y.numel() // max(ways, 1)
            queries = episode.query_y.numel() // max(ways, 1)
            scores.append(100.0 * episode_accuracy(learner, episode.to(device), query_batches))
    if split:
        # Python floats travel pickled (exact); blocks come back in rank order = episode order, so the
        # summary below is computed from the very list a single process would have.
        parts = dist_helpers.all_gather_objects((scores, metric, ways, shots, queries))
        scores = [s for part in parts for s in part[0]]
        metrics = {part[1] for part in parts if part[1] is not None}
        if len(metrics) > 1:
            raise ValueError("the episodes mix classification (integer labels) and regression (float targets); "
                             "evaluate them separately")
        metric, ways, shots, queries = next((part[1:] for part in parts if part[1] is not None), (None, 0, 0, 0))
    mean, ci, std = mean_ci95(scores)
    meta = episodes.describe() if hasattr(episodes, "describe") else {}
    regression = metric == "mse"
    steps = getattr(learner, "eval_inner_steps", None)
    return EvalResult(mean=mean, ci95=ci, std=std, n=len(scores), ways=ways, shots=shots, queries=queries,
                      transductive=bool(getattr(learner, "transductive", False)), seed=meta.get("seed"),
                      fingerprint=meta.get("fingerprint"), protocol=protocol,
                      accuracies=[] if regression else scores, metric=metric or "accuracy",
                      adapt_steps=int(steps) if steps is not None else None, mses=scores if regression else [],
                      query_batches=query_batches)
