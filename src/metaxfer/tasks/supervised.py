"""Seeded supervised mini-batches over all classes of a split, for pretraining transfer baselines.

Transfer baselines (Baseline / Baseline++, Chen et al. 2019, "A Closer Look at
Few-shot Classification", ICLR) pretrain a backbone with an ordinary
classifier over every training class, then adapt to novel classes at test
time. :class:`ClassBatchSampler` feeds that pretraining through the same
:func:`metaxfer.fit` loop the meta-learners use: it has the interface ``fit``
needs (``sample_batch``, ``state_dict`` / ``load_state_dict``, ``dataset``) and
returns its batches as :class:`~metaxfer.tasks.episode.Episode` objects.

The convention (what a pretraining learner's ``loss`` reads):

* ``support_x`` ``[n, batch_size, *x_shape]``: ``n`` mini-batches of images;
* ``support_y`` ``[n, batch_size]`` (int64): GLOBAL class labels
  ``0 .. num_classes-1`` over the whole split (the rank of the dataset's label
  among its sorted distinct labels; for Omniglot and the cluster datasets that
  is the dataset label itself), NOT episode-local labels;
* ``query_x`` ``[n, 0, *x_shape]`` and ``query_y`` ``[n, 0]``: empty.

The empty query set is how a learner tells a supervised batch from an episode
(an episode always has queries).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metaxfer.errors import EpisodeError
from metaxfer.tasks.episode import Episode
from metaxfer.tasks.sampler import dataset_labels, gather

__all__ = ["ClassBatchSampler", "is_supervised_batch"]


def is_supervised_batch(batch: Episode) -> bool:
    """True for a :class:`ClassBatchSampler` batch (global labels, empty query set)."""
    return batch.query_y.numel() == 0 and batch.support_y.numel() > 0


class ClassBatchSampler:
    """Shuffled epochs of labelled mini-batches over every class of a dataset, with global labels.

    Each epoch is a fresh permutation of all examples drawn with the sampler's
    own :class:`torch.Generator` (never the global RNG), and the batches are
    consecutive slices of the concatenated epochs: every example is seen exactly
    once per epoch, and a batch that crosses an epoch boundary takes its tail
    from the next epoch's permutation (no example is dropped or repeated within
    an epoch). :meth:`state_dict` stores the generator state from before the
    current epoch's permutation and the position in it, so a resumed run draws
    exactly the batches an uninterrupted run draws.

    Args:
        dataset: any dataset exposing ``labels`` (or ``targets``) and items by
            index, as for :class:`~metaxfer.tasks.sampler.EpisodeSampler`;
            ``dataset.gather(indices)`` is used when present.
        batch_size: examples per mini-batch.
        seed: seed of the sampler's own generator.

    Raises:
        EpisodeError: for a non-positive ``batch_size``, a ``batch_size``
            larger than the dataset, an empty dataset, or a dataset without labels.

    Example:
        >>> sampler = ClassBatchSampler(train_set, batch_size=64, seed=0)
        >>> batch = sampler.sample_batch(1)   # support_x [1, 64, 1, 28, 28], support_y [1, 64] in 0..num_classes-1
        >>> batch.query_x.shape                # torch.Size([1, 0, 1, 28, 28])
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int = 0) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise EpisodeError(f"batch_size must be a positive integer, got {batch_size!r}; set train.batch_size to 1 or "
                               "more (e.g. 64)")
        labels = dataset_labels(dataset)  # EpisodeError naming the dataset when it has no labels
        if labels.numel() == 0:
            raise EpisodeError(f"{type(dataset).__name__} is empty: the split holds no examples; check the split name "
                               "and data root")
        if batch_size > labels.numel():
            raise EpisodeError(f"batch_size={batch_size} but the dataset has only {labels.numel()} examples; lower "
                               f"train.batch_size to at most {labels.numel()}")
        self.dataset = dataset
        self.batch_size, self.seed = batch_size, seed
        # Global labels: rank among the sorted distinct labels, so any integer labels map onto 0..C-1.
        self.classes, self.labels = torch.unique(labels, sorted=True, return_inverse=True)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self.epoch = -1
        self._epoch_state: Tensor = self.generator.get_state()
        self._order: Tensor = torch.empty(0, dtype=torch.long)
        self._position = 0
        self._next_epoch()

    @property
    def num_classes(self) -> int:
        """Number of classes, i.e. the size of the pretraining classifier (labels are ``0 .. num_classes-1``)."""
        return len(self.classes)

    def __len__(self) -> int:
        """Examples per epoch."""
        return self.labels.numel()

    def _next_epoch(self) -> None:
        self._epoch_state = self.generator.get_state()  # what resume replays to rebuild this permutation
        self._order = torch.randperm(len(self), generator=self.generator)
        self._position = 0
        self.epoch += 1

    def draw_indices(self) -> Tensor:
        """Dataset indices of the next mini-batch, ``[batch_size]``."""
        parts, need = [], self.batch_size
        while need > 0:
            if self._position == len(self):
                self._next_epoch()
            take = self._order[self._position : self._position + need]
            self._position += take.numel()
            need -= take.numel()
            parts.append(take)
        return torch.cat(parts)

    def batch_from_indices(self, indices: Tensor) -> Episode:
        """The :class:`Episode` convention of this module for ``[n, batch_size]`` dataset indices."""
        x = gather(self.dataset, indices)  # [n, B, *x_shape]
        n = indices.shape[0]
        return Episode(x, self.labels[indices], x.new_empty((n, 0, *x.shape[2:])), torch.empty(n, 0, dtype=torch.long))

    def sample_batch(self, tasks: int = 1) -> Episode:
        """``tasks`` consecutive mini-batches stacked as ``[tasks, batch_size, ...]`` (see the module docstring).

        ``fit`` calls this with ``tasks_per_step``; 1 (the default) gives one
        mini-batch of ``batch_size`` examples per step.
        """
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks <= 0:
            raise EpisodeError(f"tasks must be a positive integer, got {tasks!r}; set train.tasks_per_step to 1 or more")
        indices = torch.stack([self.draw_indices() for _ in range(tasks)])
        self.batches_drawn += tasks
        return self.batch_from_indices(indices)

    def fixed_episodes(self, n: int = 600, seed: int = 0) -> Any:
        """Not available: supervised batches have no query set to score.

        Raises:
            EpisodeError: always; validate and test on episodes of the val/test
                split from an :class:`~metaxfer.tasks.sampler.EpisodeSampler`.
        """
        raise EpisodeError("a ClassBatchSampler draws pretraining batches without queries; build fixed validation or "
                           "test episodes with an EpisodeSampler over the val/test split (build_sampler with "
                           "sampler='episodes')")

    def state_dict(self) -> dict[str, Any]:
        """Generator state before the current epoch's permutation and the position in it, for exact resume."""
        return {"epoch_generator": self._epoch_state.clone(), "position": self._position, "epoch": self.epoch,
                "batches_drawn": self.batches_drawn, "seed": self.seed, "batch_size": self.batch_size,
                "examples": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            EpisodeError: when the state comes from a sampler over a dataset of another size.
        """
        if int(state.get("examples", len(self))) != len(self):
            raise EpisodeError(f"the sampler state was saved over {state['examples']} examples but this dataset has "
                               f"{len(self)}; resume with the same data split, or start a new run directory")
        self.generator.set_state(state["epoch_generator"])
        self._next_epoch()  # replays the permutation and leaves the generator where the original run had it
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])
        self.batches_drawn = int(state["batches_drawn"])

    def describe(self) -> dict[str, Any]:
        """What identifies this stream in a result record."""
        return {"sampler": "classes", "batch_size": self.batch_size, "classes": self.num_classes,
                "examples": len(self), "seed": self.seed}
