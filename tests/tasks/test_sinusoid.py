"""Sinusoid regression tasks (Finn et al. 2017, section 5.1): ranges, shapes, determinism, exact resume,
the fixed-set interface :func:`metaxfer.evaluate` uses, errors that say what to change, and the MLP backbone."""

from __future__ import annotations

import math

import pytest
import torch

from metaxfer.backbones import MLP, create
from metaxfer.build import build_sampler
from metaxfer.config import DataConfig
from metaxfer.data.registry import create_dataset
from metaxfer.errors import ConfigError, EpisodeError
from metaxfer.tasks import Episode, SinusoidEpisodeSet, SinusoidTasks
from metaxfer.train.state import join_tensors, split_tensors


def test_shapes_dtypes_and_ranges():
    tasks = SinusoidTasks(shots=5, queries=10, seed=0)
    batch = tasks.sample_batch(400)
    assert isinstance(batch, Episode)
    assert [tuple(t.shape) for t in batch] == [(400, 5, 1), (400, 5, 1), (400, 10, 1), (400, 10, 1)]
    assert all(t.dtype == torch.float32 for t in batch)
    assert batch.is_batched and batch.num_tasks == 400 and batch.ways == 0
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5 and x.max() <= 5 and x.min() < -4.9 and x.max() > 4.9
    assert y.abs().max() <= 5.0
    amplitude, phase, _ = tasks.draw(2000)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0 and amplitude.mean() == pytest.approx(2.55, abs=0.15)
    assert 0.0 <= phase.min() and phase.max() <= math.pi and phase.mean() == pytest.approx(math.pi / 2, abs=0.1)
    one = tasks.sample()
    assert not one.is_batched and one.support_x.shape == (5, 1) and one.query_y.shape == (10, 1)


def test_targets_are_the_task_function():
    episodes = SinusoidTasks(shots=10, queries=3, split="test").fixed_episodes(4, seed=1)
    for i, ep in enumerate(episodes):
        a, phi = episodes.amplitude[i], episodes.phase[i]
        torch.testing.assert_close(ep.support_y, a * torch.sin(ep.support_x - phi))
        torch.testing.assert_close(ep.query_y, episodes.curve(i, ep.query_x))


def test_same_seed_same_tasks_and_fixed_sets_are_fixed():
    a, b = SinusoidTasks(5, 10, seed=3), SinusoidTasks(5, 10, seed=3)
    for _ in range(3):
        for ta, tb in zip(a.sample_batch(7), b.sample_batch(7)):
            assert torch.equal(ta, tb)
    first, again = a.fixed_episodes(20, seed=5), a.fixed_episodes(20, seed=5)
    assert first.fingerprint == again.fingerprint
    assert all(torch.equal(x, y) for i in range(20) for x, y in zip(first[i], again[i]))
    # Drawing a fixed set leaves the training stream alone.
    for ta, tb in zip(a.sample_batch(4), b.sample_batch(4)):
        assert torch.equal(ta, tb)
    assert a.fixed_episodes(20, seed=6).fingerprint != first.fingerprint
    # Splits are disjoint streams of the same distribution.
    test = SinusoidTasks(5, 10, seed=3, split="test").fixed_episodes(20, seed=5)
    assert test.fingerprint != first.fingerprint
    assert not torch.equal(SinusoidTasks(5, 10, seed=4).sample_batch(2).support_x, SinusoidTasks(5, 10, seed=3).sample_batch(2).support_x)


def test_state_dict_resumes_exactly_without_pickle():
    tasks = SinusoidTasks(5, 10, seed=0)
    tasks.sample_batch(25)
    # The trainer stores sampler state as JSON + safetensors (metaxfer.train.state); round-trip it that way.
    tensors: dict[str, torch.Tensor] = {}
    state = join_tensors(split_tensors(tasks.state_dict(), tensors), tensors)
    expected = [tasks.sample_batch(25) for _ in range(2)]
    resumed = SinusoidTasks(5, 10, seed=0)
    resumed.load_state_dict(state)
    assert resumed.episodes_drawn == 25
    for want in expected:
        assert all(torch.equal(x, y) for x, y in zip(resumed.sample_batch(25), want))


def test_fixed_set_interface():
    episodes = SinusoidTasks(shots=5, queries=7, split="val").fixed_episodes(10, seed=2)
    assert isinstance(episodes, SinusoidEpisodeSet) and len(episodes) == 10
    last = episodes[-1]
    assert all(torch.equal(x, y) for x, y in zip(last, episodes[9]))
    part = episodes[2:5]
    assert len(part) == 3 and all(torch.equal(x, y) for x, y in zip(part[0], episodes[2]))
    sizes = [b.num_tasks for b in episodes.batches(4)]
    assert sizes == [4, 4, 2]
    first = next(episodes.batches(4))
    assert first.support_x.shape == (4, 5, 1) and torch.equal(first.task(1).query_y, episodes[1].query_y)
    meta = episodes.describe()
    assert meta["episodes"] == 10 and meta["shots"] == 5 and meta["queries"] == 7 and meta["seed"] == 2
    assert meta["fingerprint"] == episodes.fingerprint and len(meta["fingerprint"]) == 16
    with pytest.raises(IndexError):
        episodes[10]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"shots": 0}, EpisodeError, "shots must be a positive integer, got 0; set shots to 1 or more"),
        ({"queries": -1}, EpisodeError, "set queries to 1 or more"),
        ({"shots": 2.5}, EpisodeError, "shots must be a positive integer"),
        ({"amplitude": (5.0, 0.1)}, ConfigError, "amplitude range is reversed: got (5.0, 0.1); give it as (low, high) = (0.1, 5.0)"),
        ({"x_range": (5, -5)}, ConfigError, "x_range range is reversed"),
        ({"amplitude": (-1.0, 5.0)}, ConfigError, "amplitude must be >= 0.0"),
        ({"phase": (0.0,)}, ConfigError, "phase must be a (low, high) pair"),
        ({"phase": (0.0, float("inf"))}, ConfigError, "phase must be finite"),
        ({"split": "dev"}, ConfigError, "unknown sinusoid split 'dev'; choose one of"),
        ({"seed": -1}, ConfigError, "seed must be a non-negative integer"),
    ],
)
def test_invalid_arguments_say_what_to_change(kwargs, error, message):
    with pytest.raises(error) as info:
        SinusoidTasks(**kwargs)
    assert message in str(info.value)


def test_invalid_sizes_at_sampling_time():
    tasks = SinusoidTasks()
    with pytest.raises(EpisodeError, match="tasks must be a positive integer"):
        tasks.sample_batch(0)
    with pytest.raises(EpisodeError, match="n must be a positive integer"):
        tasks.fixed_episodes(0)
    with pytest.raises(EpisodeError, match="set train.ways=1 and eval.ways=1"):
        tasks.episode_sampler(ways=5, shots=5, queries=10, seed=0)


def test_registered_as_a_dataset_that_samples_its_own_episodes():
    dist = create_dataset("sinusoid", split="test", root="/ignored", amplitude=[0.5, 1.0])
    assert isinstance(dist, SinusoidTasks) and dist.split == "test" and dist.amplitude == (0.5, 1.0)
    sampler = build_sampler(DataConfig(dataset="sinusoid", args={"amplitude": [0.5, 1.0]}), "test", 1, 3, 4, seed=7)
    assert (sampler.shots, sampler.queries, sampler.seed, sampler.split) == (3, 4, 7, "test")
    assert sampler.amplitude == (0.5, 1.0) and sampler.dataset.describe()["dataset"] == "sinusoid"
    with pytest.raises(ConfigError, match="amplitude range is reversed"):
        build_sampler(DataConfig(dataset="sinusoid", args={"amplitude": [1.0, 0.5]}), "train", 1, 3, 4, seed=0)


def test_mlp_backbone():
    net = create("mlp", in_features=1, hidden=[40, 40], out_features=1)
    assert isinstance(net, MLP)
    assert sum(p.numel() for p in net.parameters()) == (1 * 40 + 40) + (40 * 40 + 40) + (40 * 1 + 1)
    assert [type(m).__name__ for m in net.layers] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert net(torch.zeros(7, 1)).shape == (7, 1)
    assert create("mlp", in_features=3, hidden=[], out_features=2)(torch.zeros(4, 3)).shape == (4, 2)
    with pytest.raises(ConfigError, match="hidden=\\[40, 0\\]"):
        MLP(1, [40, 0], 1)
