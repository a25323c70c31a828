"""Seeded episode sampling over any labelled dataset.

A dataset works with :class:`EpisodeSampler` when it exposes its labels as
``dataset.labels`` (or ``dataset.targets``, as torchvision datasets do): a
sequence or 1-D tensor of integer class ids, one per example. Examples are
fetched with ``dataset.gather(indices) -> Tensor[k, ...]`` when the dataset
has it (one vectorised index into an in-memory tensor), else with
``dataset[i][0]`` one at a time.

All randomness comes from the sampler's own :class:`torch.Generator`, never
from Python's global ``random`` or torch's global generator, so the same seed
gives the same episodes on every run, machine and process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from metaxfer.errors import EpisodeError
from metaxfer.tasks.episode import Episode


class LabelledDataset(Protocol):
    """What the sampler needs: labels, and items by index."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def dataset_labels(dataset: Any) -> Tensor:
    """The integer labels of ``dataset`` as a 1-D int64 tensor.

    Raises:
        EpisodeError: when the dataset exposes neither ``labels`` nor ``targets``.
    """
    for name in ("labels", "targets"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    raise EpisodeError(
        f"{type(dataset).__name__} does not expose its labels: give it a `labels` attribute "
        "(a sequence or 1-D tensor with one integer class id per example)"
    )


def gather(dataset: Any, indices: Tensor) -> Tensor:
    """Fetch the inputs of ``dataset`` at ``indices`` (any shape) as one tensor ``[*indices.shape, *x_shape]``."""
    flat = indices.reshape(-1)
    fast = getattr(dataset, "gather", None)
    if callable(fast):
        x = fast(flat)
    else:
        x = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in flat])
    return x.reshape(*indices.shape, *x.shape[1:])


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EpisodeError(f"{name} must be a positive integer, got {value!r}; set {name} to 1 or more")


class EpisodeSampler:
    """Draws ``ways``-way ``shots``-shot episodes with ``queries`` query examples per class.

    Args:
        dataset: any dataset exposing ``labels`` (see module docstring).
        ways: classes per episode.
        shots: support examples per class.
        queries: query examples per class.
        seed: seed of the sampler's own generator.

    Raises:
        EpisodeError: on zero or negative sizes, ``ways`` larger than the number
            of classes, or a class with fewer than ``shots + queries`` examples.

    Example:
        >>> sampler = EpisodeSampler(dataset, ways=5, shots=1, queries=15, seed=0)
        >>> batch = sampler.sample_batch(tasks=4)   # Episode of [4, 5, ...] / [4, 75, ...] tensors
        >>> test = sampler.fixed_episodes(600, seed=0)  # the same 600 episodes on every machine
    """

    def __init__(self, dataset: Any, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        _check_positive(ways=ways, shots=shots, queries=queries)
        labels = dataset_labels(dataset)
        if labels.numel() == 0:
            raise EpisodeError(f"{type(dataset).__name__} is empty: the split holds no examples; check the split name and data root")
        classes, counts = torch.unique(labels, return_counts=True)
        if ways > len(classes):
            raise EpisodeError(
                f"ways={ways} but the dataset has only {len(classes)} classes; "
                f"lower ways to at most {len(classes)} or use a split with more classes"
            )
        need = shots + queries
        smallest = int(counts.min())
        if smallest < need:
            bad = int(classes[counts.argmin()])
            names = getattr(dataset, "class_names", None)
            which = f"class {names[bad]!r} (label {bad})" if names is not None and bad < len(names) else f"class {bad}"
            raise EpisodeError(
                f"{which} has only {smallest} examples but shots + queries = {shots} + {queries} = {need}; "
                f"lower shots or queries so that shots + queries <= {smallest}, or drop the classes with fewer examples"
            )
        self.dataset = dataset
        self.ways, self.shots, self.queries, self.seed = ways, shots, queries, seed
        self.classes = classes
        order = torch.argsort(labels, stable=True)
        self._members: list[Tensor] = list(torch.split(order, counts.tolist()))
        # Equal class sizes (Omniglot: 20 per character) allow one vectorised draw per episode.
        self._table = torch.stack(self._members) if bool((counts == counts[0]).all()) else None
        self.generator = torch.Generator().manual_seed(seed)
        self.episodes_drawn = 0

    @property
    def num_classes(self) -> int:
        """Number of classes the sampler draws from."""
        return len(self.classes)

    def draw_indices(self, generator: torch.Generator | None = None) -> Tensor:
        """Dataset indices of one episode, ``[ways, shots + queries]``: row ``c`` is class ``c``'s support then query."""
        g = self.generator if generator is None else generator
        need = self.shots + self.queries
        chosen = torch.randperm(self.num_classes, generator=g)[: self.ways]
        if self._table is not None:
            rows = self._table[chosen]
            picks = torch.rand(rows.shape, generator=g).argsort(dim=1)[:, :need]
            return torch.gather(rows, 1, picks)
        return torch.stack(
            [self._members[c][torch.randperm(len(self._members[c]), generator=g)[:need]] for c in chosen.tolist()]
        )

    def episode_from_indices(self, indices: Tensor) -> Episode:
        """Build an :class:`Episode` from ``[ways, shots + queries]`` or ``[T, ways, shots + queries]`` dataset indices."""
        x = gather(self.dataset, indices)
        lead = indices.shape[:-2]
        ways = indices.shape[-2]
        s, q = self.shots, self.queries
        x_shape = x.shape[indices.dim():]
        per_class = indices.dim() - 1  # the shots + queries dimension of x
        support_x = x.narrow(per_class, 0, s).reshape(*lead, ways * s, *x_shape)
        query_x = x.narrow(per_class, s, q).reshape(*lead, ways * q, *x_shape)
        labels = torch.arange(ways)
        support_y = labels.repeat_interleave(s).expand(*lead, ways * s).contiguous()
        query_y = labels.repeat_interleave(q).expand(*lead, ways * q).contiguous()
        return Episode(support_x, support_y, query_x, query_y)

    def sample(self) -> Episode:
        """One episode without a task dimension."""
        self.episodes_drawn += 1
        return self.episode_from_indices(self.draw_indices())

    def sample_batch(self, tasks: int) -> Episode:
        """A meta-batch of ``tasks`` episodes stacked as ``[tasks, ...]`` tensors."""
        _check_positive(tasks=tasks)
        self.episodes_drawn += tasks
        return self.episode_from_indices(torch.stack([self.draw_indices() for _ in range(tasks)]))

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def fixed_episodes(self, n: int = 600, seed: int = 0) -> EpisodeSet:
        """A fixed set of ``n`` episodes drawn with a fresh generator seeded by ``seed``.

        The set does not touch this sampler's own generator, so drawing it does
        not change the training stream.
        """
        _check_positive(n=n)
        g = torch.Generator().manual_seed(seed)
        indices = torch.stack([self.draw_indices(g) for _ in range(n)])
        return EpisodeSet(self, indices, seed)

    def state_dict(self) -> dict[str, Any]:
        """Generator state and position, for exact resume."""
        return {"generator": self.generator.get_state(), "episodes_drawn": self.episodes_drawn, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.generator.set_state(state["generator"])
        self.episodes_drawn = int(state["episodes_drawn"])


class EpisodeSet(Sequence[Episode]):
    """A fixed, indexable set of episodes (indices are stored; images are gathered on access).

    ``fingerprint`` is a sha256 of the dataset indices: two machines that print
    the same fingerprint evaluated on exactly the same episodes.
    """

    def __init__(self, sampler: EpisodeSampler, indices: Tensor, seed: int) -> None:
        self.sampler = sampler
        self.indices = indices  # [n, ways, shots + queries]
        self.seed = seed

    def __len__(self) -> int:
        return self.indices.shape[0]

    def __getitem__(self, i: int) -> Episode:  # type: ignore[override]
        if isinstance(i, slice):
            return EpisodeSet(self.sampler, self.indices[i], self.seed)  # type: ignore[return-value]
        return self.sampler.episode_from_indices(self.indices[i])

    def batches(self, tasks: int) -> Iterator[Episode]:
        """Iterate in meta-batches of up to ``tasks`` episodes, stacked as ``[tasks, ...]``."""
        for start in range(0, len(self), tasks):
            yield self.sampler.episode_from_indices(self.indices[start : start + tasks])

    @property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the episodes' dataset indices."""
        return hashlib.sha256(self.indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """What identifies this set in a result record."""
        s = self.sampler
        return {"episodes": len(self), "ways": s.ways, "shots": s.shots, "queries": s.queries,
                "seed": self.seed, "fingerprint": self.fingerprint}
