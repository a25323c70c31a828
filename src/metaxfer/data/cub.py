"""CUB-200-2011 birds (Wah et al. 2011) with the few-shot class split of Chen et al. (2019).

Wah, Branson, Welinder, Perona & Belongie, "The Caltech-UCSD Birds-200-2011
dataset", Caltech CNS-TR-2011-001: 11,788 photos of 200 bird species.

Few-shot split of Chen, Liu, Kira, Wang & Huang, "A closer look at few-shot
classification", ICLR 2019 (``filelists/CUB/write_CUB_filelist.py`` in
github.com/wyharveychen/CloserLookFewShot): with the 200 class folders sorted
by name and numbered from 0, class ``i`` is in

* train (``base``, 100 classes) when ``i % 2 == 0``,
* val (50 classes) when ``i % 4 == 1``,
* test (``novel``, 50 classes) when ``i % 4 == 3``.

Layout (the official archive ``CUB_200_2011.tgz`` extracted): the data root
(``root=`` or ``$METAXFER_DATA/cub``) holds ``CUB_200_2011/`` or is that folder::

    CUB_200_2011/classes.txt              # "1 001.Black_footed_Albatross" ... "200 200.Common_Yellowthroat"
    CUB_200_2011/images/001.Black_footed_Albatross/*.jpg

Class numbering follows ``classes.txt`` (ids 1..200, i.e. the sorted folder
names). All images of a class are used (the dataset's own train/test split of
images is ignored, as in Chen et al.). Images are decoded once with Pillow
(RGB, resized to ``image_size``, 84 by default) and the ``uint8`` pixels cached
in ``$METAXFER_CACHE/cub`` or ``~/.cache/metaxfer/cub``. :func:`download_cub`
fetches and verifies the official archive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaxfer.data.fewshot_io import (
    BenchmarkImages,
    check_split,
    download_and_extract,
    group_by_class,
    load_file_pixels,
    make_preprocess,
    resolve_benchmark_root,
)
from metaxfer.data.image_folder import list_images
from metaxfer.data.images import ImagePreprocess
from metaxfer.data.paths import cache_folder
from metaxfer.errors import DataError

logger = logging.getLogger(__name__)

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
#: MD5 of the official ``CUB_200_2011.tgz`` (as checked by torchmeta, avalanche and others).
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_FOLDER = "CUB_200_2011"

SPLITS = ("train", "val", "test", "trainval")
#: Classes per split on the full data.
SPLIT_CLASSES = {"train": 100, "val": 50, "test": 50}
_HOW_TO_GET = (
    f"pass root= the folder holding {CUB_FOLDER}/ (extracted from CUB_200_2011.tgz), set METAXFER_DATA so "
    f"that it is in $METAXFER_DATA/cub/, or fetch the official archive with metaxfer.data.cub.download_cub(root)"
)


def in_split(index: int, split: str) -> bool:
    """Whether the class with 0-based ``index`` (in sorted folder order) is in ``split`` (Chen et al. 2019)."""
    if split == "train":
        return index % 2 == 0
    if split == "val":
        return index % 4 == 1
    if split == "test":
        return index % 4 == 3
    if split == "trainval":
        return index % 4 != 3
    raise ValueError(f"unknown CUB split {split!r}")


def read_classes_txt(path: Path) -> list[str]:
    """Class folder names from ``classes.txt`` (``"<id> <name>"`` lines), ordered by id.

    Raises:
        DataError: naming the file (and line) when it is missing, malformed, or
            its ids are not 1..K without gaps or repeats.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(
            f'{path} not found; CUB needs classes.txt ("1 001.Black_footed_Albatross" ...) next to images/. '
            f"To fix: {_HOW_TO_GET}."
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path} cannot be read ({type(e).__name__}: {e}); restore it from CUB_200_2011.tgz"
        ) from None
    entries: dict[int, str] = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2 or not fields[0].isdigit():
            raise DataError(
                f"{path}:{i}: expected '<id> <class folder>', got {line!r}; fix or restore the file"
            )
        cid = int(fields[0])
        if cid in entries:
            raise DataError(
                f"{path}:{i}: class id {cid} appears twice; restore the file from CUB_200_2011.tgz"
            )
        entries[cid] = fields[1].strip()
    if sorted(entries) != list(range(1, len(entries) + 1)):
        raise DataError(
            f"{path}: class ids must be 1..{len(entries)} without gaps; restore it from CUB_200_2011.tgz"
        )
    if not entries:
        raise DataError(f"{path} lists no classes; restore it from CUB_200_2011.tgz")
    return [entries[i] for i in range(1, len(entries) + 1)]


def find_cub_folder(root: Path) -> Path:
    """``root/CUB_200_2011`` or ``root`` itself, whichever holds ``images/``.

    Raises:
        DataError: when neither does, saying how to get the files.
    """
    for folder in (root / CUB_FOLDER, root):
        if (folder / "images").is_dir():
            return folder
    hint = ""
    if (root / "CUB_200_2011.tgz").is_file():
        hint = f" ({root / 'CUB_200_2011.tgz'} is there: extract it with `tar xzf CUB_200_2011.tgz`)"
    raise DataError(
        f"CUB images not found: neither {root / CUB_FOLDER / 'images'} nor {root / 'images'} "
        f"exists{hint}. To fix: {_HOW_TO_GET}."
    )


class CUB(BenchmarkImages):
    """CUB-200-2011 in memory, ``float32 [3, H, W]`` images, with the 100 / 50 / 50 class split of Chen et al. 2019.

    Wah et al., "The Caltech-UCSD Birds-200-2011 dataset", 2011; split of
    Chen et al., "A closer look at few-shot classification", ICLR 2019.

    Args:
        root: folder holding ``CUB_200_2011/`` (or that folder); default ``$METAXFER_DATA/cub``.
        split: ``"train"`` (class index % 2 == 0), ``"val"`` (% 4 == 1),
            ``"test"`` (% 4 == 3) or ``"trainval"``.
        image_size: output side (or ``(height, width)``); 84 by default.
        resample: Pillow resize filter name.
        preprocess: an :class:`ImagePreprocess` (or its dict) replacing ``image_size`` / ``resample``.
        cache: True for the default cache folder, a folder, or False for none.

    Attributes:
        labels: ``int64 [N]`` class id per example.
        class_names: class folder names (``"001.Black_footed_Albatross"``), sorted.
        files: the N image paths, in example order.

    Raises:
        DataError: missing root, ``images/`` or ``classes.txt``; a class named
            in ``classes.txt`` without a folder or images; a corrupted image (named).
        ConfigError: an unknown split.

    Example:
        >>> test = CUB(root="/data/cub", split="test")   # 50 species
        >>> test.num_classes, test.gather(torch.tensor([0])).shape
        (50, torch.Size([1, 3, 84, 84]))
    """

    name = "cub"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        image_size: int | Sequence[int] = 84,
        resample: str = "bilinear",
        preprocess: ImagePreprocess | dict[str, Any] | None = None,
        cache: bool | str | os.PathLike[str] = True,
    ) -> None:
        check_split("CUB", split, SPLITS)
        self.split = split
        self.preprocess = make_preprocess(preprocess, image_size, resample)
        self.root = resolve_benchmark_root(
            root, self.name, f"{CUB_FOLDER}/ with classes.txt and images/", "CUB"
        )
        folder = find_cub_folder(self.root)
        all_classes = read_classes_txt(folder / "classes.txt")
        chosen = [c for i, c in enumerate(all_classes) if in_split(i, split)]
        per_class = []
        for c in chosen:
            d = folder / "images" / c
            if not d.is_dir():
                raise DataError(
                    f"{folder / 'classes.txt'} lists class {c} but {d} does not exist; restore the images "
                    f"from CUB_200_2011.tgz"
                )
            files = list_images(d)
            if not files:
                raise DataError(
                    f"CUB class folder {d} holds no images; restore them from CUB_200_2011.tgz"
                )
            per_class.append(files)
        self.class_names, files, self.labels = group_by_class(chosen, per_class)
        self.files: list[Path] = files
        self._pixels, fingerprint = load_file_pixels(
            files,
            folder,
            self.preprocess,
            cache_folder(cache, self.name),
            f"{self.name}-{split}",
        )
        self._record = {"protocol": "chen2019", "files_fingerprint": fingerprint[:16]}
        logger.info(
            "CUB %s: %d images of %d classes from %s",
            split,
            len(files),
            self.num_classes,
            folder,
        )


def download_cub(
    root: str | os.PathLike[str], *, force: bool = False, timeout: float = 60.0
) -> Path:
    """Download the official ``CUB_200_2011.tgz`` (about 1.1 GB) into ``root`` and extract ``CUB_200_2011/``.

    The archive's MD5 (:data:`CUB_MD5`) is checked before it is renamed into
    place; an already extracted folder is left alone unless ``force``.

    Args:
        root: destination; use it as ``CUB(root=root)``.
        force: download and extract again even when the files exist.
        timeout: socket timeout in seconds.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: network error, checksum mismatch or a damaged archive.
    """
    return download_and_extract(
        CUB_URL,
        root,
        [f"{CUB_FOLDER}/classes.txt", f"{CUB_FOLDER}/images/"],
        md5=CUB_MD5,
        force=force,
        timeout=timeout,
    )
