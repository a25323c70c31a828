"""Process-level tuning for training on CPU: the C allocator and Python's garbage collector.

Why the allocator matters: a Conv4 episode allocates and frees hundreds of
megabytes of activations every step (60-way 5-shot 5-query: 600 images, and
the first block's ``[600, 64, 28, 28]`` float tensors are 120 MB each). With
glibc's defaults every block above the mmap threshold (at most 32 MiB) is
mapped fresh from the kernel and unmapped again by ``free``, so every step
page-faults and zero-fills ~1 GB. Keeping freed memory in the process made a
ProtoNet step 1.6-2x faster on a 2-core machine (``benchmarks/README.md``).

Why the garbage collector matters: ``import torch`` leaves ~300k Python
objects, and each full (generation-2) collection walks all of them (~150 ms
here); :func:`freeze_gc` moves everything alive at that point out of the
collector's sight.

Both are for the process that trains or evaluates (a trainer, a CLI, a
benchmark), called once at start-up, never from library code on import.

Example:
    >>> import metaxfer.runtime
    >>> metaxfer.runtime.tune_allocator()  # True where it applied (glibc)
    True
    >>> # ... build the dataset, model and optimizer, then, before the training loop:
    >>> frozen = metaxfer.runtime.freeze_gc()
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
from dataclasses import asdict, dataclass

__all__ = ["AllocatorSettings", "allocator_settings", "freeze_gc", "tune_allocator"]

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4

# mallopt takes a C int, so no setting can exceed INT_MAX bytes (2 GiB - 1).
_INT_MAX = 2**31 - 1
# Older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
_OLD_GLIBC_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024

_ENV_SWITCH = "METAXFER_TUNE_ALLOCATOR"


@dataclass(frozen=True)
class AllocatorSettings:
    """What :func:`tune_allocator` set (sizes in bytes)."""

    mmap_threshold: int
    trim_threshold: int
    top_pad: int
    mmap_max: int | None  # 0 on glibc versions that cap the threshold at 32 MiB; None: glibc's default

    def as_dict(self) -> dict[str, int | None]:
        """The settings as a plain dict (for benchmark records and logs)."""
        return asdict(self)


_lock = threading.Lock()
_applied: AllocatorSettings | None = None


def _glibc() -> ctypes.CDLL | None:
    """The C library of this process when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def _clamp(value: int) -> int:
    return max(0, min(int(value), _INT_MAX))


def tune_allocator(
    *,
    mmap_threshold: int = 1024**3,
    trim_threshold: int = _INT_MAX,
    top_pad: int = 64 * 1024**2,
) -> bool:
    """Stop glibc from handing freed activation memory back to the OS after every step.

    Sets, with ``mallopt``:

    * ``M_MMAP_THRESHOLD`` (default 1 GiB): blocks below it come from the heap
      and are reused, instead of being mapped and unmapped each time; larger
      ones (a multi-GB dataset tensor, say) are still returned to the OS when
      freed. glibc releases that cap the threshold at 32 MiB get 32 MiB and
      ``M_MMAP_MAX = 0`` instead, which keeps every large block in the heap;
    * ``M_TRIM_THRESHOLD`` (default 2 GiB - 1, the largest ``mallopt`` takes):
      free memory at the top of the heap stays mapped rather than being
      trimmed on ``free``;
    * ``M_TOP_PAD`` (default 64 MiB): the heap grows in large steps.

    The cost: the process keeps its peak heap (resident memory does not shrink
    after a large step). That is what a training loop wants; call it in the
    process that trains, not from library code.

    Once the settings are in effect, later calls do nothing and return True.
    With a C library other than glibc (macOS, Windows, musl), or when the
    environment variable ``METAXFER_TUNE_ALLOCATOR=0``, nothing changes: it
    logs why at debug level and returns False.

    Args:
        mmap_threshold: blocks of at least this many bytes are mapped from the
            kernel and unmapped on ``free`` (at most 2**31 - 1).
        trim_threshold: bytes of free memory at the heap top that glibc keeps
            (at most 2**31 - 1).
        top_pad: extra bytes requested from the OS whenever the heap grows.

    Returns:
        True when the settings are in effect in this process.
    """
    global _applied
    with _lock:
        if _applied is not None:
            return True
        if os.environ.get(_ENV_SWITCH, "1").strip().lower() in {"0", "false", "no", "off"}:
            logger.debug("allocator tuning disabled by %s=%s", _ENV_SWITCH, os.environ[_ENV_SWITCH])
            return False
        libc = _glibc()
        if libc is None:
            logger.debug("allocator tuning skipped: the C library is not glibc (no mallopt)")
            return False
        mmap_threshold, trim_threshold, top_pad = _clamp(mmap_threshold), _clamp(trim_threshold), _clamp(top_pad)
        mmap_max: int | None = None
        if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
            # Older glibc refuses thresholds above 32 MiB (HEAP_MAX_SIZE / 2): take the largest it accepts and
            # stop it from mapping larger blocks at all, so they are reused from the heap too.
            mmap_threshold = min(mmap_threshold, _OLD_GLIBC_MAX_MMAP_THRESHOLD)
            mmap_max = 0
            if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1 or libc.mallopt(_M_MMAP_MAX, 0) != 1:
                logger.debug("mallopt refused the mmap settings; allocator left as it was")
                return False
        if libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1 or libc.mallopt(_M_TOP_PAD, top_pad) != 1:
            logger.debug("mallopt refused M_TRIM_THRESHOLD or M_TOP_PAD; allocator only partly tuned")
            return False
        _applied = AllocatorSettings(mmap_threshold, trim_threshold, top_pad, mmap_max)
        logger.debug("glibc allocator tuned: %s", _applied)
        return True


def allocator_settings() -> AllocatorSettings | None:
    """The settings :func:`tune_allocator` applied in this process, or None."""
    return _applied


def freeze_gc() -> int:
    """Collect once, then exclude every object alive now from future garbage collections.

    Call it after the long-lived state is built (imports, dataset, model,
    optimizer) and before the loop: each automatic full collection then walks
    only the objects created since, instead of the ~300k that ``import torch``
    alone leaves (a full collection took ~150 ms here). Objects frozen are
    never freed by the cyclic collector (reference counting still frees
    them), so call it once, not per step. A no-op on interpreters without
    ``gc.freeze`` (before CPython 3.7).

    Returns:
        The number of objects frozen (0 where unsupported).
    """
    if not hasattr(gc, "freeze"):
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
