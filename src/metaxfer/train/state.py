"""Trainer state without pickle: nested structures split into JSON + safetensors.

Optimiser and scheduler ``state_dict()``s, RNG states and counters are nested
dicts/lists of numbers, strings and tensors. Tensors go to a safetensors file
under generated keys; everything else (with ``{"__tensor__": key}`` markers)
goes to JSON. Loading never executes code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from metaxfer.atomic import atomic_write, atomic_write_json
from metaxfer.errors import CheckpointError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_INTKEYS = "__intkeys__"


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in ``obj`` by a marker, collecting the tensors in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        # Optimiser states are keyed by int parameter ids; JSON keys are strings.
        if obj and all(isinstance(k, int) for k in obj):
            return {_INTKEYS: {str(k): split_tensors(v, tensors) for k, v in obj.items()}}
        return {str(k): split_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {_TUPLE: [split_tensors(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} without pickle; keep trainer state to tensors, numbers and strings")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(join_tensors(v, tensors) for v in obj[_TUPLE])
        if _INTKEYS in obj:
            return {int(k): join_tensors(v, tensors) for k, v in obj[_INTKEYS].items()}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save_state(directory: Path, name: str, state: dict[str, Any]) -> None:
    """Write ``state`` as ``name.json`` + ``name.safetensors`` in ``directory`` (each atomically)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_tensors(state, tensors)
    atomic_write(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_json(directory / f"{name}.json", skeleton)


def load_state(directory: Path, name: str) -> dict[str, Any]:
    """Read what :func:`save_state` wrote.

    Raises:
        CheckpointError: when either file is missing, truncated or corrupted.
    """
    try:
        skeleton = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / f"{name}.safetensors"))
        return join_tensors(skeleton, tensors)
    except (OSError, json.JSONDecodeError, SafetensorError, KeyError, ValueError) as e:
        raise CheckpointError(f"trainer state in {directory} is missing or damaged ({e}); resume from another checkpoint") from None
