"""Image decoding and preprocessing shared by datasets and learners.

:class:`ImagePreprocess` is the single definition of "how a picture becomes a
tensor". Datasets decode through it and learners carry it (``to_dict`` /
``from_dict``), so that a user's own images are preprocessed exactly like the
training images were.

It works in two stages so that datasets can cache compactly:

1. :meth:`ImagePreprocess.to_pixels` - Pillow ``convert(mode)`` then
   ``resize`` to ``uint8 [N, C, H, W]``. This is the expensive, lossy part;
   datasets store its output (1 byte per pixel).
2. :meth:`ImagePreprocess.from_pixels` - scale to ``[0, 1]`` float32,
   optionally invert, optionally normalise. Cheap and elementwise, so it is run
   on every batch, and it commutes with 90-degree rotations.

``preprocess(images) == preprocess.from_pixels(preprocess.to_pixels(images))``
by definition, which is what makes a dataset's tensors and ``preprocess([img])``
equal bit for bit.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metaxfer.atomic import atomic_write
from metaxfer.errors import ConfigError

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _per_channel(name: str, value: float | Sequence[float] | None, channels: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (float(value),) * channels if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != channels:
        raise ConfigError(f"{name} has {len(values)} values but mode has {channels} channels; give one value per channel")
    return values


@dataclass(frozen=True)
class ImagePreprocess:
    """Pillow image(s) -> ``float32 [N, C, H, W]`` tensor.

    Args:
        size: output size, an int for square ``size x size`` or ``(height, width)``.
        mode: Pillow mode to convert to first ("L" grayscale -> C=1, "RGB" -> C=3).
            Converting *before* resizing matters: Pillow resizes mode "1"
            (1-bit) images with NEAREST whatever ``resample`` says.
        invert: map ``v -> 1 - v`` after scaling to ``[0, 1]``, so that dark
            strokes on white paper (Omniglot) become 1 on a 0 background, as in
            the ProtoNet code.
        resample: Pillow filter name: nearest, box, bilinear, hamming, bicubic
            or lanczos (the MAML / cbfinn Omniglot recipe).
        mean: optional per-channel mean (or one float for all) subtracted after
            scaling and inversion.
        std: optional per-channel std (or one float) divided by after ``mean``.

    Example:
        >>> pre = ImagePreprocess(size=28)
        >>> x = pre([Image.open("my_character.png")])   # float32 [1, 1, 28, 28] in [0, 1]
        >>> ImagePreprocess.from_dict(pre.to_dict()) == pre
        True
    """

    size: int | tuple[int, int]
    mode: str = "L"
    invert: bool = True
    resample: str = "lanczos"
    mean: float | tuple[float, ...] | None = None
    std: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        size = self.size
        if isinstance(size, (list, tuple)):
            size = tuple(int(s) for s in size)
            if len(size) != 2:
                raise ConfigError(f"size must be an int or (height, width), got {self.size!r}")
        elif isinstance(size, int) and not isinstance(size, bool):
            size = int(size)
        else:
            raise ConfigError(f"size must be an int or (height, width), got {self.size!r}")
        if min((size,) if isinstance(size, int) else size) <= 0:
            raise ConfigError(f"size must be positive, got {self.size!r}")
        # frozen dataclass: normalise lists from YAML/JSON into hashable tuples.
        object.__setattr__(self, "size", size)
        try:
            Image.getmodebands(self.mode)
        except (KeyError, ValueError):
            raise ConfigError(f"unknown Pillow mode {self.mode!r}; use 'L' (grayscale) or 'RGB'") from None
        if self.resample.lower() not in _RESAMPLE:
            raise ConfigError(f"unknown resample {self.resample!r}; choose one of: {', '.join(_RESAMPLE)}")
        object.__setattr__(self, "resample", self.resample.lower())
        c = self.channels
        object.__setattr__(self, "mean", _per_channel("mean", self.mean, c))
        std = _per_channel("std", self.std, c)
        if std is not None and min(std) <= 0:
            raise ConfigError(f"std must be positive, got {self.std!r}")
        object.__setattr__(self, "std", std)

    @property
    def height_width(self) -> tuple[int, int]:
        """Output ``(height, width)``."""
        return (self.size, self.size) if isinstance(self.size, int) else self.size  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Output channels C (1 for "L", 3 for "RGB")."""
        return Image.getmodebands(self.mode)

    def to_pixels(self, images: Sequence[Image.Image]) -> Tensor:
        """Convert and resize: the lossy, cacheable stage.

        Args:
            images: N Pillow images of any mode and size.

        Returns:
            ``uint8 [N, C, H, W]``.
        """
        h, w = self.height_width
        out = np.empty((len(images), h, w, self.channels), dtype=np.uint8)
        resample = _RESAMPLE[self.resample]
        for i, image in enumerate(images):
            if image.mode != self.mode:
                image = image.convert(self.mode)
            if image.size != (w, h):
                image = image.resize((w, h), resample=resample)
            out[i] = np.asarray(image, dtype=np.uint8).reshape(h, w, self.channels)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def from_pixels(self, pixels: Tensor) -> Tensor:
        """Scale, invert and normalise: the cheap, elementwise stage.

        Args:
            pixels: ``uint8 [..., C, H, W]`` as returned by :meth:`to_pixels`
                (any leading shape, e.g. ``[C, H, W]`` or ``[N, C, H, W]``).

        Returns:
            ``float32`` tensor of the same shape.
        """
        if pixels.dtype != torch.uint8:
            raise TypeError(f"from_pixels expects a uint8 tensor, got {pixels.dtype}")
        # Invert in uint8 so that 0 and 255 map exactly to 1.0 and 0.0.
        x = (255 - pixels) if self.invert else pixels
        x = x.to(torch.float32).div_(255.0)
        if self.mean is not None:
            x = x.sub_(torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1))
        if self.std is not None:
            x = x.div_(torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1))
        return x

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        """Preprocess N images into ``float32 [N, C, H, W]``."""
        if isinstance(images, Image.Image):
            images = [images]
        return self.from_pixels(self.to_pixels(images))

    def decode_key(self) -> str:
        """Identifies the output of :meth:`to_pixels` (used in cache file names)."""
        h, w = self.height_width
        return f"{self.mode}-{self.resample}-{h}x{w}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/JSON/checkpoint friendly)."""
        return {
            "size": self.size if isinstance(self.size, int) else list(self.size),
            "mode": self.mode,
            "invert": self.invert,
            "resample": self.resample,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagePreprocess:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: on unknown keys.
        """
        unknown = set(data) - {"size", "mode", "invert", "resample", "mean", "std"}
        if unknown:
            raise ConfigError(f"unknown ImagePreprocess keys {sorted(unknown)}; allowed: size, mode, invert, resample, mean, std")
        return cls(**data)


class PixelDataset:
    """Shared protocol of the in-memory image datasets (Omniglot, image folders, IDX files).

    A subclass sets ``self._pixels`` (``uint8 [N, C, H, W]``, as decoded),
    ``self.labels`` (``int64 [N]``), ``self.class_names`` and ``self.preprocess``
    (an :class:`ImagePreprocess`); this gives it ``len``, indexing, the
    vectorised :meth:`gather` that :class:`~metaxfer.tasks.EpisodeSampler` uses,
    and ``num_classes``. Pixels stay ``uint8`` in memory (4x smaller than
    float) and are scaled only for the images a batch needs.
    """

    _pixels: Tensor
    labels: Tensor
    class_names: list[str]
    preprocess: ImagePreprocess

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def pixels(self) -> Tensor:
        """All images as stored: ``uint8 [N, C, H, W]`` before scaling."""
        return self._pixels

    def __len__(self) -> int:
        return self._pixels.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Image ``float32 [C, H, W]`` (after ``preprocess``) and its class id."""
        i = int(index)
        return self.preprocess.from_pixels(self._pixels[i]), int(self.labels[i])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All examples: ``float32 [N, C, H, W]`` images and ``int64 [N]`` labels."""
        return self.preprocess.from_pixels(self._pixels), self.labels

    def gather(self, indices: Tensor) -> Tensor:
        """Images at ``indices`` (``int64 [k]``, or any shape) as ``float32 [*indices.shape, C, H, W]``.

        One vectorised index into the ``uint8`` tensor, then scaling.
        """
        return self.preprocess.from_pixels(self._pixels[torch.as_tensor(indices, dtype=torch.long)])


# ---------------------------------------------------------------- decoding and the pixel cache of datasets


def decode_images(
    count: int, load: Callable[[int], Image.Image], preprocess: ImagePreprocess, desc: str, chunk: int = 256
) -> Tensor:
    """``preprocess.to_pixels`` over ``load(0) .. load(count - 1)`` in chunks, with a progress bar.

    Returns ``uint8 [count, C, H, W]``; ``chunk`` images are held decoded at once. Errors raised by
    ``load`` (which should name the image) propagate.
    """
    from tqdm import tqdm  # plain tqdm: tqdm.auto warns in notebooks without ipywidgets

    h, w = preprocess.height_width
    pixels = torch.empty((count, preprocess.channels, h, w), dtype=torch.uint8)
    logger.info("decoding %d images (%s); done once, then cached", count, desc)
    with tqdm(total=count, desc=desc, unit="img", disable=None, leave=False) as bar:
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            pixels[start:stop] = preprocess.to_pixels([load(i) for i in range(start, stop)])
            bar.update(stop - start)
    return pixels


def read_pixel_cache(
    file: Path, parse: Callable[[dict[str, str], Tensor], _T | None], what: str = "cache", source: str = "the data",
    redo: str = "decoding again", stacklevel: int = 2,
) -> _T | None:
    """``parse(metadata, pixels)`` of a cache file written by :func:`write_pixel_cache`, or None.

    A bad cache is only a cache miss: None without a warning when ``file`` does not exist,
    with a warning when it cannot be read (any exception, in ``parse`` too) or when ``parse``
    rejects it by returning None. ``what``, ``source`` and ``redo`` word the warnings;
    ``stacklevel`` is counted from the caller of this function.
    """
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            pixels = f.get_tensor("pixels")
        result = parse(meta, pixels)
    except Exception as e:  # noqa: BLE001  any unreadable cache is only a cache miss
        warnings.warn(f"ignoring unreadable {what} {file} ({type(e).__name__}: {e}); {redo}", stacklevel=stacklevel + 1)
        return None
    if result is None:
        msg = f"ignoring {what} {file}: it does not match {source} or settings; {redo}"
        warnings.warn(msg, stacklevel=stacklevel + 1)
    return result


def write_pixel_cache(
    file: Path, pixels: Tensor, meta: dict[str, str], what: str = "cache", stacklevel: int = 2
) -> None:
    """Save ``pixels`` (``uint8``) with string ``meta`` to the safetensors ``file``, atomically.

    Temp file + fsync + os.replace: readers (other processes too) see either no cache or a
    complete one, never a half-written file. A read-only or full cache folder only warns
    (``stacklevel`` counted from the caller): it costs a decode next time, not the run.
    """
    from safetensors.torch import save_file

    try:
        atomic_write(file, lambda tmp: save_file({"pixels": pixels.contiguous()}, str(tmp), metadata=meta))
        logger.info("cached decoded images in %s", file)
    except OSError as e:
        msg = f"could not write {what} {file} ({e}); set METAXFER_CACHE to a writable folder"
        warnings.warn(msg, stacklevel=stacklevel + 1)
