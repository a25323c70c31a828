"""ClassBatchSampler: shuffled epochs over every example, global labels, exact resume, input validation."""

from __future__ import annotations

import pytest
import torch

from metaxfer.build import build_sampler
from metaxfer.config import DataConfig, config_from_dict
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.tasks.supervised import ClassBatchSampler, is_supervised_batch


class _Labelled:
    """Each image is its own index (so a batch says which examples it holds); labels are arbitrary integers."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((1, 2, 2), float(i)), int(self.labels[i])


def test_epochs_cover_every_example_once(clusters):
    sampler = ClassBatchSampler(clusters, batch_size=32, seed=0)
    stream = torch.cat([sampler.draw_indices() for _ in range(25)])  # 800 = 4 epochs of 200; batches straddle epochs
    epochs = stream.reshape(4, 200)
    for e in epochs:
        assert torch.equal(e.sort().values, torch.arange(200))
    assert not torch.equal(epochs[0], epochs[1])  # each epoch is reshuffled
    assert sampler.epoch == 3


def test_batch_layout_and_global_labels():
    data = _Labelled([30, 10, 50, 10, 30, 50, 50])  # non-contiguous class ids -> ranks 0..2
    sampler = ClassBatchSampler(data, batch_size=3, seed=1)
    batch = sampler.sample_batch(2)
    assert batch.support_x.shape == (2, 3, 1, 2, 2) and batch.support_y.shape == (2, 3)
    assert batch.query_x.shape == (2, 0, 1, 2, 2) and batch.query_y.shape == (2, 0)
    assert batch.num_tasks == 2 and is_supervised_batch(batch)
    idx = batch.support_x[:, :, 0, 0, 0].long()
    expected = {10: 0, 30: 1, 50: 2}
    assert torch.equal(batch.support_y, torch.tensor([[expected[int(data.labels[i])] for i in row] for row in idx]))
    assert sampler.num_classes == 3 and sampler.batches_drawn == 2


def test_labels_are_the_dataset_labels_for_contiguous_classes(clusters):
    sampler = ClassBatchSampler(clusters, batch_size=50, seed=0)
    idx = sampler.draw_indices()
    batch = sampler.batch_from_indices(idx[None])
    assert torch.equal(batch.support_y[0], clusters.labels[idx])
    assert torch.equal(batch.support_x[0], clusters.images[idx])
    assert sampler.num_classes == 20


def test_same_seed_same_batches_and_own_generator(clusters):
    before = torch.get_rng_state()
    a = ClassBatchSampler(clusters, 16, seed=3).sample_batch(3)
    b = ClassBatchSampler(clusters, 16, seed=3).sample_batch(3)
    c = ClassBatchSampler(clusters, 16, seed=4).sample_batch(3)
    assert torch.equal(a.support_y, b.support_y) and torch.equal(a.support_x, b.support_x)
    assert not torch.equal(a.support_x, c.support_x)
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is never used


@pytest.mark.parametrize("drawn", [0, 5, 12, 13])  # 13 * 16 = 208: just past the first epoch boundary
def test_resume_is_exact(clusters, drawn):
    a = ClassBatchSampler(clusters, 16, seed=0)
    for _ in range(drawn):
        a.sample_batch(1)
    state = a.state_dict()
    expected = [a.sample_batch(1).support_y for _ in range(20)]
    b = ClassBatchSampler(clusters, 16, seed=0)
    b.sample_batch(1)  # a different position, overwritten by the state
    b.load_state_dict(state)
    assert b.batches_drawn == drawn
    assert all(torch.equal(e, b.sample_batch(1).support_y) for e in expected)


def test_resume_rejects_another_dataset(clusters):
    state = ClassBatchSampler(clusters, 16).state_dict()
    with pytest.raises(EpisodeError, match="same data split"):
        ClassBatchSampler(_Labelled([0, 1] * 10), 4).load_state_dict(state)


@pytest.mark.parametrize("bad", [0, -3, True, 2.5])
def test_bad_batch_size(clusters, bad):
    with pytest.raises(EpisodeError, match="train.batch_size"):
        ClassBatchSampler(clusters, bad)


def test_batch_size_larger_than_dataset():
    with pytest.raises(EpisodeError, match="at most 4"):
        ClassBatchSampler(_Labelled([0, 1, 0, 1]), 5)


def test_dataset_without_labels_or_examples():
    with pytest.raises(EpisodeError, match="does not expose its labels"):
        ClassBatchSampler([torch.zeros(1)] * 3, 2)
    with pytest.raises(EpisodeError, match="empty"):
        ClassBatchSampler(_Labelled([]), 2)


def test_no_fixed_episodes_and_bad_tasks(clusters):
    sampler = ClassBatchSampler(clusters, 8)
    with pytest.raises(EpisodeError, match="EpisodeSampler"):
        sampler.fixed_episodes(10)
    with pytest.raises(EpisodeError, match="tasks_per_step"):
        sampler.sample_batch(0)


def test_config_and_build_sampler():
    cfg = config_from_dict({"train": {"sampler": "classes", "batch_size": 32}})
    assert cfg.train.sampler == "classes" and cfg.train.batch_size == 32
    assert config_from_dict({}).train.sampler == "episodes"
    data = DataConfig(dataset="clusters", args={"num_classes": 6, "per_class": 5, "image_size": 8})
    sampler = build_sampler(data, "train", 5, 1, 1, seed=0, sampler="classes", batch_size=8)
    assert isinstance(sampler, ClassBatchSampler) and sampler.num_classes == 6
    assert build_sampler(data, "train", 5, 1, 1, seed=0).ways == 5  # episodes stay the default
    with pytest.raises(ConfigError, match="choose 'episodes'"):
        build_sampler(data, "train", 5, 1, 1, seed=0, sampler="batches", batch_size=8)
    with pytest.raises(ConfigError, match="train.batch_size"):
        build_sampler(data, "train", 5, 1, 1, seed=0, sampler="classes")
    with pytest.raises(ConfigError, match="samples its own"):
        build_sampler(DataConfig(dataset="sinusoid"), "train", 1, 5, 5, seed=0, sampler="classes", batch_size=8)
