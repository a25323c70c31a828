"""Run configurations: typed dataclasses, packaged YAML presets, ``key=value`` overrides.

A preset is a YAML file under ``metaxfer/configs/`` (``omniglot/protonet_5w1s``).
Every key is checked against the dataclasses below; an unknown key is an error
that lists the valid ones.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

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
    val_split: str | None = "val"  # null: no validation (e.g. the lake protocol has no val alphabets)
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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does.

    PyYAML follows YAML 1.1, where a float needs a dot: ``3e-5`` and ``1e4`` load as the *strings*
    ``"3e-5"`` and ``"1e4"``, which reach ``torch.optim.Adam(lr="3e-5")`` as a TypeError far from the
    config. Here they are floats, in presets, run configs and ``key=value`` overrides alike.
    """


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str | IO[str]) -> Any:
    """Parse YAML safely, reading ``3e-5`` as a number (YAML 1.2) rather than a string (PyYAML's YAML 1.1).

    Args:
        text: a YAML document or an open text file.

    Returns:
        The parsed value: a scalar for an override's value, a mapping for a config file.
    """
    return yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader subclass


def value_kind(annotation: Any) -> tuple[Callable[[Any], bool], str] | None:
    """``(check(value) -> bool, description)`` of a type annotation, or ``None`` for one that cannot be checked.

    For the settings people type (``int``, ``float``, ``str``, ``bool``, ``None``, their unions and lists
    of numbers or strings): ``value_kind(float | None)`` accepts ``0.1`` and ``None`` and reads "a number or null".
    """
    if annotation is bool:
        return (lambda v: isinstance(v, bool)), "true or false"
    if annotation is int:
        return (lambda v: isinstance(v, int) and not isinstance(v, bool)), "an integer"
    if annotation is float:
        return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"
    if annotation is str:
        return (lambda v: isinstance(v, str)), "a string"
    if annotation is type(None):
        return (lambda v: v is None), "null"
    origin, members = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is dict or origin is dict:
        return (lambda v: isinstance(v, dict)), "a mapping ({key: value, ...})"
    if origin in (typing.Union, types.UnionType):
        kinds = [value_kind(m) for m in members]
        if any(k is None for k in kinds):
            return None
        return (lambda v: any(check(v) for check, _ in kinds)), " or ".join(d for _, d in kinds)  # type: ignore[misc]
    if origin in (list, tuple, collections.abc.Sequence) and len(members) in (1, 2):
        if len(members) == 2 and members[1] is not Ellipsis:
            return None  # a fixed-length tuple: not worth describing
        item = value_kind(members[0])
        if item is None:
            return None
        check, description = item
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(description)
        if plural is None:
            return None
        return (lambda v: isinstance(v, (list, tuple)) and all(check(x) for x in v)), f"a list of {plural}"
    return None


def _check_scalar(value: Any, annotation: Any, key: str) -> Any:
    """``value`` as a field of type ``annotation`` (``int``, ``float | None``, ...) holds it, or a ConfigError.

    Coerced first as YAML and the command line would mean it: an integer where a float is declared, an
    integral float where an integer is (``train.steps=1e4``), a number where text is (a data root named
    ``2024``). Annotations :func:`value_kind` cannot check (``Any``) pass through.
    """
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(annotation)) if union else {annotation}
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if float in kinds and number:
        value = float(value)
    elif int in kinds and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif str in kinds and number:
        value = str(value)
    kind = value_kind(annotation)
    if kind is None or kind[0](value):
        return value
    raise ConfigError(f"{key} must be {kind[1]}, got {value!r} ({type(value).__name__})")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
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
            kwargs[name] = _check_scalar(value, hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


_SECTIONS: dict[Any, type] = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "TrainConfig": TrainConfig,
                              "EvalConfig": EvalConfig}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`.

    Raises:
        ConfigError: naming any unknown key and listing the valid ones, or a value of the wrong
            type (``train.lr must be a number, got 'fast' (str)``).
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
        _set_dotted(data, key.strip(), load_yaml(raw) if raw else None)
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
        ConfigError: for an unknown preset (listing the presets), an unknown key or a value of the wrong type.
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
            data = load_yaml(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)
