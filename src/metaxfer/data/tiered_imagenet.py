"""tieredImageNet (Ren et al. 2018): 608 ImageNet classes under 34 categories, split by category.

Ren, Triantafillou, Ravi, Snell, Swersky, Tenenbaum, Larochelle & Zemel,
"Meta-learning for semi-supervised few-shot classification", ICLR 2018
(github.com/renmengye/few-shot-ssl-public). 351 train / 97 val / 160 test
classes from 20 / 6 / 8 disjoint high-level categories, 779,165 images.

Two on-disk formats are supported (``format="auto"`` picks per split, folders first):

* ``"pickle"`` - the authors' release: ``<split>_images_png.pkl`` (a list of
  PNG-encoded 84x84 images, each a ``uint8`` numpy array) and
  ``<split>_labels.pkl`` (a dict with ``label_specific`` - class id per image -
  ``label_specific_str`` - class names - and ``label_general`` /
  ``label_general_str`` - category per image / category names). Pickles are read
  with an allow-list (numpy arrays and plain containers only), so a data file
  cannot run code. The PNGs are decoded with Pillow (true RGB; note that the
  authors' own loader decodes with OpenCV and so feeds BGR).
  The decompressed ``<split>_images.npz`` caches of that code are not read.
* ``"folders"`` - ``<split>/<class>/*.{jpg,png}`` (``train/``, ``val/``,
  ``test/``), as written by the ``tiered-imagenet-tools`` generator and most
  re-packaged copies.

Data root: ``root=`` or ``$METAXFER_DATA/tiered_imagenet``. Decoded ``uint8``
pixels are cached (safetensors) in ``$METAXFER_CACHE/tiered_imagenet`` or
``~/.cache/metaxfer/tiered_imagenet``; the train split at 84x84 is about
9.5 GB of memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metaxfer.data.fewshot_io import (
    BenchmarkImages,
    as_text,
    cached_pixels,
    check_disjoint,
    check_split,
    class_folders,
    decode_images,
    files_fingerprint,
    group_by_class,
    load_data_pickle,
    load_file_pixels,
    make_preprocess,
    nested_hint,
    pickle_get,
    resolve_benchmark_root,
)
from metaxfer.data.image_folder import open_png_bytes
from metaxfer.data.images import ImagePreprocess
from metaxfer.data.paths import cache_folder
from metaxfer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "trainval")
FORMATS = ("auto", "pickle", "folders")
#: Classes per split (Ren et al. 2018).
SPLIT_CLASSES = {"train": 351, "val": 97, "test": 160}
_LAYOUT = "train_images_png.pkl + train_labels.pkl (and val_/test_), or train/, val/, test/ folders of class folders"
_FRESH_COPY = (
    "delete it and get a fresh copy of the tieredImageNet release (Ren et al. 2018)"
)


def _pickle_files(root: Path, part: str) -> tuple[Path, Path]:
    return root / f"{part}_images_png.pkl", root / f"{part}_labels.pkl"


def _read_labels(path: Path) -> tuple[Tensor, list[str], list[str] | None]:
    """Class id per image, class names and (when present) each class's category name."""
    data = load_data_pickle(path, _FRESH_COPY)
    try:
        labels = (
            np.asarray(pickle_get(data, "label_specific", path))
            .astype(np.int64)
            .reshape(-1)
        )
    except (TypeError, ValueError) as e:
        raise DataError(
            f"{path}: label_specific is not a list of class ids ({e}); {_FRESH_COPY}"
        ) from None
    names = [as_text(s) for s in pickle_get(data, "label_specific_str", path)]
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(
            f"{path}: class ids range over {labels.min()}..{labels.max()} but label_specific_str names "
            f"{len(names)} classes; {_FRESH_COPY}"
        )
    categories = None
    if isinstance(data, dict) and any(
        k in data for k in ("label_general", b"label_general")
    ):
        general = (
            np.asarray(pickle_get(data, "label_general", path))
            .astype(np.int64)
            .reshape(-1)
        )
        general_names = [
            as_text(s) for s in pickle_get(data, "label_general_str", path)
        ]
        if len(general) == len(labels) and (
            not general.size or general.max() < len(general_names)
        ):
            categories = [""] * len(names)
            for c, g in zip(labels.tolist(), general.tolist()):
                categories[c] = general_names[g]
    return torch.from_numpy(labels), names, categories


def _decode_png_pickle(
    path: Path, count: int, preprocess: ImagePreprocess, stem: str
) -> Tensor:
    images = load_data_pickle(path, _FRESH_COPY)
    if isinstance(images, dict) or not hasattr(images, "__len__"):
        raise DataError(
            f"{path} holds a {type(images).__name__}, not a list of PNG images; is it the right file?"
        )
    if len(images) != count:
        raise DataError(
            f"{path} holds {len(images)} images but the labels file lists {count}; use the matching pair of "
            f"_images_png.pkl and _labels.pkl files"
        )

    def load(i: int) -> Image.Image:
        item = images[i]
        data = item.tobytes() if isinstance(item, np.ndarray) else bytes(item)
        return open_png_bytes(
            data, f"{path}: image {i}", f"; the file is damaged: {_FRESH_COPY}"
        )

    return decode_images(count, load, preprocess, f"decoding {stem}")


class TieredImageNet(BenchmarkImages):
    """tieredImageNet in memory: ``float32 [3, H, W]`` images of 351 / 97 / 160 classes.

    Ren et al., "Meta-learning for semi-supervised few-shot classification",
    ICLR 2018. Train, val and test classes come from disjoint ImageNet
    categories (20 / 6 / 8).

    Args:
        root: data folder (see the module docstring); default ``$METAXFER_DATA/tiered_imagenet``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        format: ``"auto"`` (``<split>/`` folder if present, else the pickles),
            ``"pickle"`` or ``"folders"``.
        image_size: output side (or ``(height, width)``); 84 is standard (the
            pickled PNGs are 84x84).
        resample: Pillow resize filter name.
        preprocess: an :class:`ImagePreprocess` (or its dict) replacing
            ``image_size`` / ``resample``.
        cache: True for the default cache folder, a folder, or False for none.

    Attributes:
        labels: ``int64 [N]`` class id per example.
        class_names: class names (pickle: ``label_specific_str``; folders: the
            sorted folder names; with trainval, train's then val's).
        class_categories: pickle format only: the high-level category of each
            class (``label_general_str``), else None.
        format: the format that was read (``"pickle"`` or ``"folders"``).

    Raises:
        DataError: missing root or split files, truncated or foreign pickles,
            images and labels of different lengths, corrupted images (named).
        ConfigError: an unknown split or format.

    Example:
        >>> test = TieredImageNet(root="/data/tiered_imagenet", split="test")   # 160 classes
        >>> test.gather(torch.tensor([0])).shape
        torch.Size([1, 3, 84, 84])
    """

    name = "tiered_imagenet"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        format: str = "auto",
        image_size: int | Sequence[int] = 84,
        resample: str = "bilinear",
        preprocess: ImagePreprocess | dict[str, Any] | None = None,
        cache: bool | str | os.PathLike[str] = True,
    ) -> None:
        parts = check_split("tieredImageNet", split, SPLITS)
        if format not in FORMATS:
            raise ConfigError(
                f"unknown tieredImageNet format {format!r}; choose one of: {', '.join(FORMATS)}"
            )
        self.split = split
        self.preprocess = make_preprocess(preprocess, image_size, resample)
        self.root = resolve_benchmark_root(root, self.name, _LAYOUT, "tieredImageNet")
        cache_dir = cache_folder(cache, self.name)
        pixels: list[Tensor] = []
        labels: list[Tensor] = []
        names: list[str] = []
        categories: list[str] | None = []
        formats = []
        fingerprints = []
        for part in parts:
            fmt = self._format_of(part, format)
            stem = f"{self.name}-{part}"
            if fmt == "folders":
                n, per_class = class_folders(self.root / part, "tieredImageNet")
                n, files, lab = group_by_class(n, per_class)
                pix, fp = load_file_pixels(
                    files, self.root, self.preprocess, cache_dir, stem
                )
                cats = None
            else:
                images_pkl, labels_pkl = _pickle_files(self.root, part)
                lab, n, cats = _read_labels(labels_pkl)
                fp = files_fingerprint(self.root, [images_pkl, labels_pkl])
                pix = cached_pixels(
                    cache_dir,
                    stem,
                    fp,
                    self.preprocess,
                    len(lab),
                    partial(
                        _decode_png_pickle, images_pkl, len(lab), self.preprocess, stem
                    ),
                )
            check_disjoint(n, names, self.root)
            labels.append(lab + len(names))
            names += n
            pixels.append(pix)
            categories = (
                None if cats is None or categories is None else categories + cats
            )
            formats.append(fmt)
            fingerprints.append(fp[:16])
        self._pixels = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
        self.labels = labels[0] if len(labels) == 1 else torch.cat(labels)
        self.class_names = names
        self.class_categories = categories
        self.format = "+".join(sorted(set(formats)))
        self._record = {
            "format": self.format,
            "files_fingerprint": "+".join(fingerprints),
        }
        logger.info(
            "tieredImageNet %s: %d images of %d classes from %s",
            split,
            len(self),
            self.num_classes,
            self.root,
        )

    def _format_of(self, part: str, format: str) -> str:
        images_pkl, labels_pkl = _pickle_files(self.root, part)
        folder = self.root / part
        if format == "folders" or (format == "auto" and folder.is_dir()):
            if not folder.is_dir():
                raise DataError(
                    f"tieredImageNet folder {folder} not found{nested_hint(self.root, part)}; with "
                    f"format='folders' the data root needs {part}/CLASS_NAME/*.jpg (or use format='pickle')"
                )
            return "folders"
        if format == "auto" and not images_pkl.is_file() and not labels_pkl.is_file():
            raise DataError(
                f"tieredImageNet {part} split not found in {self.root}{nested_hint(self.root, images_pkl.name)}: "
                f"neither {images_pkl.name} + {labels_pkl.name} (the release of Ren et al. 2018) nor a "
                f"{part}/ folder of class folders; pass root= the folder that holds them"
            )
        for p in (labels_pkl, images_pkl):
            if not p.is_file():
                raise DataError(
                    f"tieredImageNet file {p} not found{nested_hint(self.root, p.name)}; put {images_pkl.name} "
                    f"and {labels_pkl.name} in {self.root} (or pass root= the folder that holds them)"
                )
        return "pickle"
