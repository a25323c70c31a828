"""Episodes (few-shot tasks) and their samplers."""

from metaxfer.tasks.episode import Episode, stack_episodes
from metaxfer.tasks.sampler import EpisodeSampler, EpisodeSet, dataset_labels, gather
from metaxfer.tasks.sinusoid import SinusoidEpisodeSet, SinusoidTasks
from metaxfer.tasks.supervised import ClassBatchSampler

__all__ = [
    "ClassBatchSampler",
    "Episode",
    "EpisodeSampler",
    "EpisodeSet",
    "SinusoidEpisodeSet",
    "SinusoidTasks",
    "dataset_labels",
    "gather",
    "stack_episodes",
]
