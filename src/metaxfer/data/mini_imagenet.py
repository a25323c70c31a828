"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017).

100 ImageNet classes x 600 images, split into 64 train / 16 val / 20 test
classes by the CSV files of Ravi & Larochelle, "Optimization as a model for
few-shot learning", ICLR 2017 (github.com/twitter/meta-learning-lstm).

Supported layouts of the data root (``root=`` or ``$METAXFER_DATA/mini_imagenet``):

1. **CSV** (the usual one)::

       train.csv  val.csv  test.csv     # "filename,label" header, then rows
       images/n0153282900000005.jpg     # every image the CSVs name
                                        # (images/<label>/<filename> is accepted too)

2. **Folders**, when ``<split>.csv`` is absent: ``<split>/<label>/*.jpg`` (one folder
   per split of class folders, as made by several conversion scripts).

Images are decoded once with Pillow (RGB, resized to ``image_size`` with
bilinear filtering; 84x84 is the standard size), and the ``uint8`` pixels are
cached (safetensors) in ``$METAXFER_CACHE/mini_imagenet`` or
``~/.cache/metaxfer/mini_imagenet``, keyed by the image files' names, sizes and
modification times and the decode settings.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaxfer.data.fewshot_io import (
    BenchmarkImages,
    check_disjoint,
    check_split,
    class_folders,
    group_by_class,
    load_file_pixels,
    make_preprocess,
    nested_hint,
    resolve_benchmark_root,
)
from metaxfer.data.images import ImagePreprocess
from metaxfer.data.paths import cache_folder
from metaxfer.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "trainval")
#: Classes per split of the Ravi & Larochelle split (600 images each).
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
_LAYOUT = "the Ravi & Larochelle split files train.csv, val.csv, test.csv and images/"


def read_split_csv(path: Path) -> list[tuple[int, str, str]]:
    """Rows of a Ravi & Larochelle split CSV as ``(line_number, filename, label)``.

    The ``filename,label`` header is optional; blank lines are skipped.

    Raises:
        DataError: naming the file (and line) when it is missing, unreadable,
            empty or has a row that is not ``filename,label``.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(
            f"{path} cannot be read as CSV ({type(e).__name__}: {e}); get a fresh copy"
        ) from None
    out = []
    for i, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if not out and [c.lower() for c in cells] == ["filename", "label"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise DataError(
                f"{path}:{i}: expected 'filename,label', got {','.join(row)!r}; fix or delete this line"
            )
        out.append((i, cells[0], cells[1]))
    if not out:
        raise DataError(
            f"{path} lists no images; it should hold 'filename,label' rows (600 per class)"
        )
    return out


def _csv_split(root: Path, part: str) -> tuple[list[str], list[list[Path]]]:
    csv_path = root / f"{part}.csv"
    images = root / "images"
    rows = read_split_csv(csv_path)
    if not images.is_dir():
        raise DataError(
            f"miniImageNet image folder {images} does not exist; put the JPEGs that {csv_path.name} names "
            f"in {images}/ (or pass root= the folder that holds both)"
        )
    by_class: dict[str, list[Path]] = {}
    missing: list[str] = []
    for line, filename, label in rows:
        path = images / filename
        if not path.is_file():
            alt = images / label / filename
            if alt.is_file():
                path = alt
            else:
                missing.append(
                    f"{csv_path}:{line} names {filename} (class {label}) but {path} does not exist"
                )
                continue
        by_class.setdefault(label, []).append(path)
    if missing:
        more = (
            f"; ... ({len(missing)} missing images in all)" if len(missing) > 3 else ""
        )
        raise DataError(
            "; ".join(missing[:3])
            + more
            + f". Restore the images into {images}/, or use the split CSVs "
            "that match your copy of miniImageNet"
        )
    names = list(by_class)
    return names, [by_class[n] for n in names]


class MiniImageNet(BenchmarkImages):
    """miniImageNet in memory: ``float32 [3, H, W]`` images of 64 / 16 / 20 classes (Ravi & Larochelle split).

    Vinyals et al., "Matching networks for one shot learning", NeurIPS 2016;
    split of Ravi & Larochelle, "Optimization as a model for few-shot
    learning", ICLR 2017.

    Args:
        root: data folder (see the module docstring for the layouts); default
            ``$METAXFER_DATA/mini_imagenet``.
        split: ``"train"`` (64 classes), ``"val"`` (16), ``"test"`` (20) or
            ``"trainval"`` (train + val).
        image_size: output side (or ``(height, width)``); 84 is standard.
        resample: Pillow resize filter name.
        preprocess: an :class:`ImagePreprocess` (or its dict) replacing
            ``image_size`` / ``resample`` (e.g. with ``mean`` / ``std``).
        cache: True for the default cache folder, a folder, or False for none.

    Attributes:
        labels: ``int64 [N]`` class id per example (what :class:`~metaxfer.tasks.EpisodeSampler` reads).
        class_names: WordNet ids (``"n01532829"``), sorted; class id = index.
        files: the N image paths, in example order.
        layout: ``"csv"`` or ``"folders"``.

    Raises:
        DataError: missing root, CSV or images folder; a CSV row naming a
            missing image; a malformed CSV line; a corrupted image (each named).
        ConfigError: an unknown split.

    Example:
        >>> train = MiniImageNet(root="/data/mini_imagenet", split="train")   # 64 classes x 600
        >>> train.gather(torch.tensor([0, 1])).shape
        torch.Size([2, 3, 84, 84])
    """

    name = "mini_imagenet"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        image_size: int | Sequence[int] = 84,
        resample: str = "bilinear",
        preprocess: ImagePreprocess | dict[str, Any] | None = None,
        cache: bool | str | os.PathLike[str] = True,
    ) -> None:
        parts = check_split("miniImageNet", split, SPLITS)
        self.split = split
        self.preprocess = make_preprocess(preprocess, image_size, resample)
        self.root = resolve_benchmark_root(root, self.name, _LAYOUT, "miniImageNet")
        names: list[str] = []
        per_class: list[list[Path]] = []
        layouts = set()
        for part in parts:
            if (self.root / f"{part}.csv").is_file():
                n, f = _csv_split(self.root, part)
                layouts.add("csv")
            elif (self.root / part).is_dir():
                n, f = class_folders(self.root / part, "miniImageNet")
                layouts.add("folders")
            else:
                raise DataError(
                    f"miniImageNet split file {self.root / f'{part}.csv'} not found"
                    f"{nested_hint(self.root, f'{part}.csv')}; the data root needs the Ravi & Larochelle CSVs "
                    f"train.csv, val.csv and test.csv ('filename,label' rows) next to images/, or one folder "
                    f"per split of class folders ({self.root / part}/n01532829/*.jpg)"
                )
            check_disjoint(n, names, self.root)
            names += n
            per_class += f
        self.layout = "+".join(sorted(layouts))
        self.class_names, files, self.labels = group_by_class(names, per_class)
        self.files: list[Path] = files
        self._pixels, fingerprint = load_file_pixels(
            files,
            self.root,
            self.preprocess,
            cache_folder(cache, self.name),
            f"{self.name}-{split}",
        )
        self._record = {"layout": self.layout, "files_fingerprint": fingerprint[:16]}
        logger.info(
            "miniImageNet %s: %d images of %d classes from %s",
            split,
            len(files),
            self.num_classes,
            self.root,
        )
