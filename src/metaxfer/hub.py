"""Saving and loading learners: a directory with ``config.json`` + ``model.safetensors`` (no pickle).

``load`` also resolves the names of the packaged model zoo
(``metaxfer.load("protonet-omniglot-5w1s")``) and training run directories
(the best checkpoint, else the latest).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaxfer import __version__
from metaxfer.atomic import atomic_write, atomic_write_json
from metaxfer.errors import CheckpointError
from metaxfer.learners.base import Learner

FORMAT = "metaxfer-learner"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def zoo_root() -> Path:
    """Folder of the packaged pretrained models."""
    return Path(str(resources.files("metaxfer") / "zoo"))


def list_zoo() -> list[str]:
    """Names of the packaged pretrained models."""
    root = zoo_root()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file()) if root.is_dir() else []


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as contiguous CPU tensors with no shared storage (what safetensors needs)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def write_learner(learner: Learner, directory: Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` of ``learner`` into an existing ``directory``."""
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metaxfer_version": __version__,
        "model": getattr(learner, "build_spec", None),
        "preprocess": getattr(learner, "preprocess_spec", None),
        "class": type(learner).__name__,
    }
    config.update(extra or {})
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state_tensors(learner), str(p), metadata={"format": FORMAT}))
    atomic_write_json(directory / CONFIG_FILE, config)


def save(learner: Learner, path: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Save ``learner`` to the directory ``path`` (created if needed).

    Args:
        learner: a learner built with :func:`metaxfer.build_learner` (so its
            spec can be written; others save weights only and need their
            model rebuilt by hand to load).
        path: target directory.
        extra: more JSON-ready fields for ``config.json`` (e.g. a model card).

    Returns:
        The directory.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    write_learner(learner, directory, extra)
    return directory


def resolve(path_or_name: str | os.PathLike[str]) -> Path:
    """Find the model directory of a zoo name, a model directory, a run directory or a run's pointer file.

    A run directory gives its best checkpoint, else its latest; its ``checkpoints/best``
    (or ``latest``) file gives the checkpoint that file names.

    Raises:
        CheckpointError: when nothing loadable is there (lists the zoo names).
    """
    path = Path(path_or_name)
    if (path / CONFIG_FILE).is_file():
        return path
    # A run directory's checkpoints/best or checkpoints/latest pointer file, or the run directory itself.
    pointer_files = [path] if path.is_file() else [path / "checkpoints" / p for p in ("best", "latest")]
    dangling = []
    for f in pointer_files:
        if f.is_file():
            target = f.parent / f.read_text(encoding="utf-8").strip()
            if (target / CONFIG_FILE).is_file():
                return target
            dangling.append(f"{f} names {target.name!r}, which holds no model")
    zoo = zoo_root() / str(path_or_name)
    if (zoo / CONFIG_FILE).is_file():
        return zoo
    if dangling:
        present = sorted(d.name for d in pointer_files[0].parent.glob("step-*") if (d / CONFIG_FILE).is_file())
        raise CheckpointError(f"no model at {str(path_or_name)!r}: {'; '.join(dangling)}; pass a checkpoint directory "
                              f"instead (there: {present or 'none'})")
    raise CheckpointError(
        f"no model at {str(path_or_name)!r}: expected a directory with {CONFIG_FILE} and {WEIGHTS_FILE}, a run "
        f"directory with checkpoints/ (or its checkpoints/best file), or a zoo name "
        f"({', '.join(list_zoo()) or 'none packaged'})"
    )


def read_config(directory: Path) -> dict[str, Any]:
    """Parse and check ``config.json`` of a saved learner."""
    file = directory / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not a readable metaxfer config ({e}); the checkpoint is damaged — re-save it") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a metaxfer learner config (missing \"format\": \"{FORMAT}\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{file} was written by a newer metaxfer (format {config['format_version']}); upgrade metaxfer")
    return config


def load_weights(learner: torch.nn.Module, file: Path) -> None:
    """Load ``model.safetensors`` into ``learner`` strictly, with errors that say what does not match."""
    try:
        state = load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint directory is incomplete") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is truncated or corrupted ({e}); use another checkpoint") from None
    own = learner.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:8]}")
        raise CheckpointError(f"{file} holds the weights of another model: {'; '.join(parts)}")
    learner.load_state_dict(state)


def load(path_or_name: str | os.PathLike[str], device: torch.device | str = "cpu") -> Learner:
    """Rebuild a saved learner (weights, architecture and input preprocessing).

    Args:
        path_or_name: a zoo name (``"protonet-omniglot-5w1s"``), a directory
            written by :func:`save`, or a training run directory.
        device: where to put the parameters.

    Returns:
        The learner in ``eval()`` mode; ``learner.preprocess(pil_images)``
        gives the tensors it was trained on, and ``learner.card`` the saved
        config (model card, training command, accuracy).

    Raises:
        CheckpointError: for a missing, truncated or mismatched checkpoint.

    Example:
        >>> learner = metaxfer.load("protonet-omniglot-5w1s")
        >>> predict = learner.adapt(learner.preprocess(support_images), support_labels)
    """
    from metaxfer.build import build_learner

    directory = resolve(path_or_name)
    config = read_config(directory)
    if not config.get("model"):
        raise CheckpointError(
            f"{directory / CONFIG_FILE} does not say how to build the model (it was saved from a learner not built "
            "with metaxfer.build_learner); rebuild the learner yourself and call metaxfer.hub.load_weights on it"
        )
    learner = build_learner(config["model"], preprocess=config.get("preprocess"))
    load_weights(learner, directory / WEIGHTS_FILE)
    learner.card = config  # type: ignore[assignment]
    return learner.to(device).eval()
