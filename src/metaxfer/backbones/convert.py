"""Load another library's state dict into a metaxfer module by renaming its keys.

Pretrained weights come with the names of the code that trained them
(torchvision, timm, lukemelas' EfficientNet-PyTorch, a ``module.`` prefix
from ``DataParallel``). :func:`load_state_dict_mapped` renames them with an
exact ``key_map`` and/or ordered regex ``rules``, drops the keys matched by
``ignore`` (e.g. a classifier head the module does not have), and loads the
result strictly: anything left unmatched on either side, or a shape that
differs, is a :class:`~metaxfer.errors.CheckpointError` that lists the keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from metaxfer.errors import CheckpointError

Rule = tuple[str, str]  # (regex over the source key, replacement with \1 groups)


class MappedLoad(NamedTuple):
    """What :func:`load_state_dict_mapped` did.

    Attributes:
        loaded: target keys that received a tensor.
        ignored: source keys dropped by ``ignore``.
    """

    loaded: list[str]
    ignored: list[str]


def _shown(keys: Sequence[str], limit: int = 12) -> str:
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def map_keys(
    state_dict: Mapping[str, Tensor],
    key_map: Mapping[str, str] | None = None,
    rules: Iterable[Rule] | None = None,
    ignore: Iterable[str] | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename the keys of ``state_dict``.

    Each source key is first looked up in ``key_map``; a key not found there
    goes through every ``(pattern, replacement)`` of ``rules`` in order
    (``re.sub`` semantics, so rules compose). Keys matching any ``ignore``
    regex (``re.fullmatch`` on the *source* name) are dropped.

    Returns:
        ``(renamed, ignored)``: the renamed dict and the dropped source keys.

    Raises:
        CheckpointError: when two source keys map onto the same target key.
    """
    compiled_rules = [(re.compile(p), r) for p, r in (rules or ())]
    compiled_ignore = [re.compile(p) for p in (ignore or ())]
    key_map = dict(key_map or {})
    renamed: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in compiled_ignore):
            ignored.append(key)
            continue
        if key in key_map:
            new = key_map[key]
        else:
            new = key
            for pattern, replacement in compiled_rules:
                new = pattern.sub(replacement, new)
        if new in renamed:
            raise CheckpointError(
                f"source keys {origin[new]!r} and {key!r} both map to {new!r}; fix key_map/rules so each target key "
                "receives one tensor (or ignore one of them)"
            )
        renamed[new], origin[new] = value, key
    return renamed, ignored


def load_state_dict_mapped(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    key_map: Mapping[str, str] | None = None,
    rules: Iterable[Rule] | None = None,
    ignore: Iterable[str] | None = None,
    allow_missing: Iterable[str] | None = None,
) -> MappedLoad:
    """Load ``state_dict`` into ``module`` after renaming its keys, strictly.

    Args:
        module: the target module.
        state_dict: source tensors with the other library's names.
        key_map: exact ``source -> target`` renames (checked first).
        rules: ordered ``(regex, replacement)`` pairs applied with ``re.sub``
            to source keys not in ``key_map``.
        ignore: regexes (full match on the source key) of tensors to drop,
            e.g. ``[r"fc\\..*"]`` for a classifier head the module lacks.
        allow_missing: regexes (full match) of *target* keys that may stay
            at their current values, e.g. BatchNorm ``num_batches_tracked``
            when the source never saved it.

    Returns:
        :class:`MappedLoad` with the loaded target keys and the ignored source keys.

    Raises:
        CheckpointError: listing target keys no source tensor maps to
            ("missing"), renamed source keys the module does not have
            ("unexpected", with their original names) and shape mismatches.
            Nothing is loaded in that case.

    Example:
        >>> net = ResNet18()
        >>> load_state_dict_mapped(net, torch.load("ddp.pth", weights_only=True), rules=[(r"^module\\.", "")])
    """
    renamed, ignored = map_keys(state_dict, key_map, rules, ignore)
    own = module.state_dict()
    allowed = [re.compile(p) for p in (allow_missing or ())]
    missing = sorted(k for k in set(own) - set(renamed) if not any(p.fullmatch(k) for p in allowed))
    # Report unexpected keys by their source name too: that is the name the user can write a rule for.
    dropped = set(ignored)
    source_of = dict(zip(renamed, (k for k in state_dict if k not in dropped)))  # same order as map_keys
    unexpected = sorted(set(renamed) - set(own))
    shapes = [f"{k}: source {tuple(renamed[k].shape)} vs module {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(renamed)) if renamed[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"module keys with no source tensor: {_shown(missing)}")
        if unexpected:
            shown = [k if source_of.get(k, k) == k else f"{source_of[k]} (-> {k})" for k in unexpected]
            parts.append(f"source keys the module does not have: {_shown(shown)}")
        if shapes:
            parts.append(f"shape mismatches: {_shown(shapes)}")
        raise CheckpointError(
            "state dict does not match the module: " + "; ".join(parts)
            + ". Add key_map entries or rules that rename the source keys onto the module's names, "
            "ignore= the source tensors the module should not have, or build the module with the matching "
            "architecture (channels, num_classes)."
        )
    with torch.no_grad():
        module.load_state_dict(renamed, strict=False)
    return MappedLoad(loaded=sorted(renamed), ignored=ignored)
