"""Run configurations: typed dataclasses, packaged YAML presets, ``key=value`` overrides.

A preset is a YAML file under ``metaxfer/configs/`` (``omniglot/protonet_5w1s``).
Every key is checked against the dataclasses below; an unknown key is an error
that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from metaxfer.errors import ConfigError


@dataclass
class ModelConfig:
    """Which learner around which backbone."""

    learner: str = "protonet"
    learner_args: dict[str, Any] = field(default_factory=dict)
    backbone: str = "conv4"
    backbone_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which dataset, with what arguments, and which splits to train, validate and test on."""

    dataset: str = "omniglot"
    args: dict[str, Any] = field(default_factory=dict)
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"


@dataclass
class TrainConfig:
    """Episode sizes and optimisation of meta-training."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    tasks_per_step: int = 1
    tasks_per_backward: int | None = None
    steps: int = 1000
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "step"
    lr_decay_every: int = 0
    lr_decay: float = 0.5
    grad_clip: float | None = None
    val_every: int = 500
    val_episodes: int = 200
    checkpoint_every: int = 500
    on_nonfinite: str = "stop"
    seed: int = 0
    # "episodes": meta-training episodes (ways/shots/queries); "classes": supervised mini-batches of
    # batch_size examples over all training classes with global labels (transfer baselines' pretraining).
    sampler: str = "episodes"
    batch_size: int = 64


@dataclass
class EvalConfig:
    """The fixed test episodes."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    episodes: int = 600
    seed: int = 0


@dataclass
class RunConfig:
    """Everything a training run needs; the packaged presets fill it."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str | None = None
    device: str = "cpu"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-ready)."""
        return dataclasses.asdict(self)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; valid keys"
            f"{' under ' + where if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        section = _SECTIONS.get(fields[name].type)  # annotations are strings (postponed evaluation)
        if section is not None:
            kwargs[name] = _from_dict(section, value or {}, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_SECTIONS: dict[Any, type] = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "TrainConfig": TrainConfig,
                              "EvalConfig": EvalConfig}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`.

    Raises:
        ConfigError: naming any unknown key and listing the valid ones.
    """
    return _from_dict(RunConfig, data, "")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars) to a config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else None)
    return data


def presets_root() -> Path:
    """Folder of the packaged YAML presets."""
    return Path(str(resources.files("metaxfer") / "configs"))


def list_presets() -> list[str]:
    """Names of the packaged presets, e.g. ``omniglot/protonet_5w1s``."""
    root = presets_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def load_config(name_or_path: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a packaged preset by name or a YAML file by path, then apply overrides.

    Raises:
        ConfigError: for an unknown preset (listing the presets) or an unknown key.
    """
    path = Path(name_or_path)
    if not path.is_file():
        candidate = presets_root() / f"{name_or_path.removesuffix('.yaml')}.yaml"
        if not candidate.is_file():
            raise ConfigError(
                f"unknown preset or config file {name_or_path!r}; presets: {', '.join(list_presets())} "
                "(or give the path of a YAML file)"
            )
        path = candidate
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)
