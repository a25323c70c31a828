"""Typed exceptions. Every message says what to change, not only what went wrong."""

from __future__ import annotations


class MetaxferError(Exception):
    """Base class of every error metaxfer raises on purpose."""


class EpisodeError(MetaxferError, ValueError):
    """Impossible episode sizes for a dataset (ways, shots, queries)."""


class DataError(MetaxferError, OSError):
    """A data file is missing, truncated or corrupted; the message names the file."""


class ConfigError(MetaxferError, ValueError):
    """An unknown or invalid configuration key, preset or registry name."""


class CheckpointError(MetaxferError, ValueError):
    """A checkpoint that cannot be loaded: another model, truncated, or missing files."""


class NonFiniteLossError(MetaxferError, FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""
