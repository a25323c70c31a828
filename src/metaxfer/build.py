"""Turn configs into objects: learner, datasets, samplers, optimiser, schedule.

This is the only place that knows concrete registries of every kind; the
learners and the trainer stay independent of each other and of the data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import metaxfer.learners  # noqa: F401  (registers the learners)
from metaxfer import transfer as _transfer  # noqa: F401  (registers baseline, baseline_pp, finetune)
from metaxfer.backbones.registry import create as create_backbone
from metaxfer.config import DataConfig, ModelConfig, TrainConfig
from metaxfer.errors import ConfigError
from metaxfer.learners.base import Learner
from metaxfer.learners.registry import create_learner
from metaxfer.registry import UnknownArgumentError


def build_learner(model: ModelConfig | dict[str, Any], preprocess: dict[str, Any] | None = None) -> Learner:
    """Build a learner from a :class:`ModelConfig` (or its dict form).

    The spec is kept on ``learner.build_spec`` so :func:`metaxfer.save` can
    write it next to the weights; ``preprocess`` (an ``ImagePreprocess`` dict)
    becomes the learner's ``preprocess``.

    Example:
        >>> learner = build_learner({"learner": "protonet", "backbone": "conv4", "backbone_args": {"in_channels": 1}})
    """
    if isinstance(model, dict):
        from metaxfer.config import _from_dict

        model = _from_dict(ModelConfig, model, "model")
    # UnknownArgumentError: a misspelt key; TypeError: a value of the wrong kind (hidden="abc").
    try:
        backbone = create_backbone(model.backbone, **model.backbone_args)
    except (UnknownArgumentError, TypeError) as e:
        raise ConfigError(f"bad backbone_args {model.backbone_args} for {model.backbone!r}: {e}") from None
    try:
        learner = create_learner(model.learner, backbone, **model.learner_args)
    except (UnknownArgumentError, TypeError) as e:
        raise ConfigError(f"bad learner_args {model.learner_args} for {model.learner!r}: {e}") from None
    learner.build_spec = dataclasses.asdict(model)  # type: ignore[assignment]
    if preprocess is not None:
        from metaxfer.data.images import ImagePreprocess

        learner.preprocessor = ImagePreprocess.from_dict(preprocess)
        learner.preprocess_spec = dict(preprocess)  # type: ignore[assignment]
    return learner


def build_dataset(data: DataConfig, split: str) -> Any:
    """Build the dataset split named by ``data`` (``root`` falls back to ``$METAXFER_DATA``)."""
    from metaxfer.data.registry import create_dataset

    kwargs = dict(data.args)
    if data.root is not None:
        kwargs["root"] = data.root
    try:
        return create_dataset(data.dataset, split=split, **kwargs)
    except UnknownArgumentError as e:
        # Typically a preset's data.args kept after data.dataset was overridden to another dataset.
        raise ConfigError(f"{e}: check data.args {dict(data.args)} (a preset's data.args stay when data.dataset "
                          "changes; data.args={} clears them)") from None


def build_sampler(data: DataConfig, split: str, ways: int | None, shots: int, queries: int, seed: int, *,
                  sampler: str = "episodes", batch_size: int | None = None) -> Any:
    """An episode sampler over the split named by ``data``.

    A class dataset (Omniglot, clusters) is wrapped in an
    :class:`~metaxfer.tasks.sampler.EpisodeSampler`; a task distribution that
    samples its own episodes (it has ``episode_sampler(ways, shots, queries,
    seed)``, e.g. the ``"sinusoid"`` regression tasks) builds its own sampler.
    Either way the result has ``sample_batch``, ``state_dict``/``load_state_dict``,
    ``fixed_episodes`` and ``dataset`` (what :func:`metaxfer.fit` and
    :func:`metaxfer.evaluate` use).

    With ``sampler="classes"`` (``train.sampler`` of the config) the split is
    instead drawn in supervised mini-batches of ``batch_size`` examples with
    global class labels (:class:`~metaxfer.tasks.supervised.ClassBatchSampler`,
    the pretraining of transfer baselines); ``ways``, ``shots`` and ``queries``
    are then unused.

    Raises:
        EpisodeError: for sizes the dataset cannot provide.
        ConfigError: for an unknown ``sampler``, or ``"classes"`` over a task
            distribution that has no classes.

    Example:
        >>> sampler = build_sampler(DataConfig(dataset="sinusoid"), "train", ways=1, shots=5, queries=10, seed=0)
    """
    from metaxfer.tasks.sampler import EpisodeSampler

    if sampler not in ("episodes", "classes"):
        raise ConfigError(f"unknown train.sampler {sampler!r}; choose 'episodes' (meta-training) or 'classes' "
                          "(supervised batches over all classes, for baseline / baseline_pp / finetune)")
    dataset = build_dataset(data, split)
    if sampler == "classes":
        from metaxfer.tasks.supervised import ClassBatchSampler

        if callable(getattr(dataset, "episode_sampler", None)):
            raise ConfigError(f"train.sampler: classes needs a class dataset, but {data.dataset!r} samples its own "
                              "tasks; use train.sampler: episodes")
        if batch_size is None:
            raise ConfigError("train.sampler: classes needs train.batch_size (examples per step, e.g. 64)")
        return ClassBatchSampler(dataset, batch_size, seed=seed)
    make = getattr(dataset, "episode_sampler", None)
    if callable(make):
        return make(ways=ways, shots=shots, queries=queries, seed=seed)
    return EpisodeSampler(dataset, ways, shots, queries, seed=seed)  # type: ignore[arg-type]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` this machine has.

    Raises:
        ConfigError: for a name torch does not know (``"gpu"``) or an accelerator this torch build or
            machine lacks (``"cuda"`` on a CPU-only install), instead of torch's error deep in training.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {str(device)!r}: this torch build or machine has no CUDA GPU; use device=cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {str(device)!r}: this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r}: MPS is not available here; use device=cpu")
    return dev


def build_optimizer(params: Any, train: TrainConfig) -> torch.optim.Optimizer:
    """Adam, or SGD with ``train.momentum`` (0.9 by default), over ``params``.

    Raises:
        ConfigError: for an unknown optimizer, ``train.lr <= 0``, or a negative momentum or weight decay.
    """
    if not train.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {train.lr} (e.g. train.lr=0.001)")
    for key in ("momentum", "weight_decay"):
        if getattr(train, key) < 0:
            raise ConfigError(f"train.{key} must be >= 0, got {getattr(train, key)}")
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    raise ConfigError(f"unknown optimizer {train.optimizer!r}; choose 'adam' or 'sgd'")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule ``train.lr_schedule`` names, stepped once per training step.

    * ``"step"``: multiply by ``lr_decay`` every ``lr_decay_every`` steps (ProtoNet's halving
      every 2000 episodes); no schedule when ``lr_decay_every`` is 0.
    * ``"linear"``: anneal linearly from ``lr`` to 0 over ``steps`` (Reptile's outer step size,
      Nichol et al. 2018).
    """
    if train.lr_schedule == "linear":
        total = max(train.steps, 1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    if train.lr_schedule != "step":
        raise ConfigError(f"unknown lr_schedule {train.lr_schedule!r}; choose 'step' or 'linear'")
    if train.lr_decay_every and train.lr_decay_every > 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.lr_decay_every, gamma=train.lr_decay)
    return None
