"""Labelled images users bring: ``root/CLASS_NAME/*.png`` (the torchvision ``ImageFolder`` layout).

Every image is decoded with Pillow and goes through one
:class:`~metaxfer.data.images.ImagePreprocess`, which converts the mode
(``"L"`` or ``"RGB"``) and resizes to a fixed size, so folders that mix
sizes, grayscale, palette, RGBA or 16-bit images load as one ``uint8
[N, C, H, W]`` tensor. Transparent pixels are composited onto white (a
drawing saved with a transparent background means "paper"), and EXIF
orientation is applied (phone photos).

Bad input policy: an unreadable file is skipped with one
:class:`UnreadableImageWarning` that names every skipped file, and the rest
loads; a :class:`~metaxfer.errors.DataError` is raised only when the result
cannot be a few-shot task: a class folder with no readable image, fewer than
two classes, or a root that does not exist.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from metaxfer.data.images import ImagePreprocess, PixelDataset
from metaxfer.errors import DataError

logger = logging.getLogger(__name__)

#: File name suffixes treated as images (lower case); other files are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_CHUNK = 256  # images held open at once while decoding


class UnreadableImageWarning(UserWarning):
    """Some image files could not be decoded and were skipped; the message names them."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image suffix and is not hidden (``.DS_Store``, ``._x.png`` resource forks)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders are skipped."""
    root = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # prune hidden folders in place
        found += [Path(dirpath) / f for f in filenames if is_image_file(Path(f))]
    return sorted(found)


_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decode(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # Pillow is lazy: decode now, while we know which file this is
        image = ImageOps.exif_transpose(im)  # a new image: safe to use after the file closes
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    elif image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Pillow's convert("L") clips 16/32-bit values at 255 instead of rescaling them: stretch to 0..255.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.round((arr - lo) / (hi - lo) * 255.0) if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(scaled.astype(np.uint8))  # 2-D uint8 -> mode "L"
    return image


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode one image file fully, upright (EXIF orientation) and with transparency composited on white.

    Raises:
        DataError: naming the file, when it is not a readable image.
    """
    p = Path(path)
    try:
        return _decode(p)
    except _DECODE_ERRORS as e:
        raise DataError(f"{p} is not a readable image ({type(e).__name__}: {e}); replace or delete the file") from None


def open_png_bytes(data: bytes, what: str, fix: str) -> Image.Image:
    """Decode one in-memory PNG (from a zip or a pickle) fully.

    Raises:
        DataError: ``"<what> is not a readable PNG (<error>)<fix>"``, when it is not a readable image.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Pillow decodes lazily: force it here so errors name this image
    except _DECODE_ERRORS as e:
        raise DataError(f"{what} is not a readable PNG ({type(e).__name__}: {e}){fix}") from e
    return image


def load_images(
    files: Sequence[Path], preprocess: ImagePreprocess
) -> tuple[Tensor, list[int], list[tuple[Path, str]]]:
    """Decode ``files`` through ``preprocess.to_pixels``, skipping the unreadable ones.

    Args:
        files: image paths.
        preprocess: the conversion (mode, size, resample) to apply.

    Returns:
        ``(pixels, kept, skipped)``: ``uint8 [len(kept), C, H, W]``, the
        indices into ``files`` that decoded, and ``(path, reason)`` for the others.
        No warning is issued here; callers word it for their context.
    """
    h, w = preprocess.height_width
    chunks: list[Tensor] = []
    kept: list[int] = []
    skipped: list[tuple[Path, str]] = []
    for start in range(0, len(files), _CHUNK):
        images = []
        for i in range(start, min(start + _CHUNK, len(files))):
            try:
                images.append(_decode(Path(files[i])))
            except _DECODE_ERRORS as e:
                skipped.append((Path(files[i]), f"{type(e).__name__}: {e}"))
            else:
                kept.append(i)
        if images:
            chunks.append(preprocess.to_pixels(images))
    pixels = torch.cat(chunks) if chunks else torch.empty((0, preprocess.channels, h, w), dtype=torch.uint8)
    return pixels, kept, skipped


def warn_skipped(skipped: Sequence[tuple[Path, str]], what: str = "images", stacklevel: int = 3) -> None:
    """One :class:`UnreadableImageWarning` naming every skipped file and why."""
    if not skipped:
        return
    listing = "; ".join(f"{p} ({reason})" for p, reason in skipped[:20])
    more = f"; ... ({len(skipped)} in all)" if len(skipped) > 20 else ""
    warnings.warn(
        f"skipped {len(skipped)} unreadable {what}: {listing}{more}. Replace or delete these files to use them.",
        UnreadableImageWarning,
        stacklevel=stacklevel,
    )


def as_preprocess(preprocess: ImagePreprocess | dict[str, Any] | None, image_size: int | Sequence[int], mode: str,
                  invert: bool, resample: str) -> ImagePreprocess:
    """``preprocess`` (an :class:`ImagePreprocess` or its dict), else one made of the other arguments."""
    if isinstance(preprocess, ImagePreprocess):
        return preprocess
    if isinstance(preprocess, dict):
        return ImagePreprocess.from_dict(preprocess)
    size = image_size if isinstance(image_size, int) else tuple(image_size)
    return ImagePreprocess(size=size, mode=mode, invert=invert, resample=resample)  # type: ignore[arg-type]


class ImageFolder(PixelDataset):
    """A labelled image folder, ``root/CLASS_NAME/**/*.{png,jpg,jpeg,bmp,gif,webp}``, in memory.

    Class ids follow the sorted class folder names. Images in nested folders
    inside a class folder belong to that class; images directly under
    ``root`` are ignored with a warning (they have no class).

    Args:
        root: the folder of class folders.
        image_size: output side (or ``(height, width)``); every image is resized to it.
        mode: ``"L"`` (grayscale, C=1) or ``"RGB"`` (C=3).
        invert: map ``v -> 1 - v`` (dark strokes on white paper become 1,
            as Omniglot-trained models expect).
        resample: Pillow resize filter name.
        preprocess: an :class:`ImagePreprocess` (or its dict) that replaces
            ``image_size``/``mode``/``invert``/``resample``; pass
            ``learner.preprocessor`` to get exactly a trained model's inputs.
        min_classes: fewer classes is a :class:`DataError` (2: one class is no classification task).
        split: recorded in :meth:`describe` only (the folder is the split).

    Attributes:
        labels: ``int64 [N]`` class id per example (what :class:`~metaxfer.tasks.EpisodeSampler` reads).
        class_names: class folder names, sorted (class id = index).
        files: the N image paths, in example order (by class, then path).
        skipped: ``(path, reason)`` of every file that could not be decoded.
        preprocess: the :class:`ImagePreprocess` the images went through.

    Raises:
        DataError: root missing or not a folder; no class folders; fewer than
            ``min_classes`` classes; a class folder without a readable image.
            Messages name the folder and say what to change.

    Warns:
        UnreadableImageWarning: naming every unreadable file (skipped, the rest loads).

    Example:
        >>> data = ImageFolder("my_support", image_size=28, mode="L", invert=True)
        >>> data.class_names, data.gather(torch.tensor([0])).shape
        (['circle', 'square'], torch.Size([1, 1, 28, 28]))
    """

    name = "image_folder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int | Sequence[int] = 84,
        mode: str = "RGB",
        invert: bool = False,
        resample: str = "bilinear",
        preprocess: ImagePreprocess | dict[str, Any] | None = None,
        min_classes: int = 2,
        split: str | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.preprocess = as_preprocess(preprocess, image_size, mode, invert, resample)
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise DataError(f"image folder {self.root} {what}; pass the folder that holds one sub-folder per class")
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        loose = sorted(p for p in self.root.iterdir() if p.is_file() and is_image_file(p))
        if not class_dirs:
            hint = (f" It holds {len(loose)} images directly ({', '.join(p.name for p in loose[:3])}"
                    f"{', ...' if len(loose) > 3 else ''}): move them into one sub-folder per class." if loose else "")
            raise DataError(f"{self.root} has no class folders; lay it out as {self.root}/CLASS_NAME/image.png "
                            f"with one sub-folder per class.{hint}")
        if loose:
            warnings.warn(f"{len(loose)} images directly in {self.root} belong to no class and are ignored "
                          f"({', '.join(p.name for p in loose[:5])}{', ...' if len(loose) > 5 else ''}); "
                          "move them into a class folder", UserWarning, stacklevel=2)
        if len(class_dirs) < min_classes:
            raise DataError(
                f"{self.root} has {len(class_dirs)} class folder(s) ({', '.join(p.name for p in class_dirs)}) but "
                f"at least {min_classes} are needed to classify; add a folder per class, each with its images"
            )
        per_class = [list_images(d) for d in class_dirs]
        empty = [d for d, f in zip(class_dirs, per_class) if not f]
        if empty:
            raise DataError(
                f"class folder(s) with no images: {', '.join(str(d) for d in empty)}; put at least one "
                f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} image in each, or remove the folder"
            )
        files = [f for fs in per_class for f in fs]
        labels_all = [c for c, fs in enumerate(per_class) for _ in fs]
        pixels, kept, self.skipped = load_images(files, self.preprocess)
        warn_skipped(self.skipped, f"images in {self.root}")
        self.files = [files[i] for i in kept]
        self.labels = torch.tensor([labels_all[i] for i in kept], dtype=torch.long)
        self.class_names = [d.name for d in class_dirs]
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        unreadable = [f"{class_dirs[c]}" for c, n in enumerate(counts) if n == 0]
        if unreadable:
            raise DataError(
                f"class folder(s) with no readable image: {', '.join(unreadable)} (see the warning for the files); "
                "replace the damaged images or remove the folder"
            )
        self._pixels = pixels
        logger.info("loaded %d images of %d classes from %s", len(self.files), len(self.class_names), self.root)

    def describe(self) -> dict[str, Any]:
        """What identifies this data in a result record (JSON-friendly)."""
        return {
            "dataset": self.name,
            "root": str(self.root),
            "split": self.split,
            "classes": self.num_classes,
            "examples": len(self),
            "skipped": len(self.skipped),
            "preprocess": self.preprocess.to_dict(),
        }

    def __repr__(self) -> str:
        return f"ImageFolder(root={str(self.root)!r}, classes={self.num_classes}, examples={len(self)})"
