"""CIFAR-FS and FC100: few-shot benchmarks built from the official CIFAR-100 python archive.

Both read ``cifar-100-python/{train,test,meta}`` (the pickles inside
``cifar-100-python.tar.gz``, Krizhevsky 2009) and use all 600 images of each
class (500 from ``train`` + 100 from ``test``), 32x32 RGB.

* **CIFAR-FS** (Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with
  differentiable closed-form solvers", ICLR 2019): 64 / 16 / 20 classes drawn at
  random from all 100.
* **FC100** (Oreshkin, Rodriguez & Lacoste, "TADAM: Task dependent adaptive
  metric for improved few-shot learning", NeurIPS 2018): split by superclass so
  that train, val and test share no superclass: 12 / 4 / 4 superclasses =
  60 / 20 / 20 classes (superclass ids 1-6, 9, 10, 15, 17-19 / 8, 11, 13, 16 /
  0, 7, 12, 14).

The class lists are package data, ``metaxfer/data/splits/cifar_fs/*.txt`` and
``metaxfer/data/splits/fc100/*.txt`` (one fine label name per line; the files
say where they come from). Data root: ``root=`` (the folder holding
``cifar-100-python/``, or that folder itself) or ``$METAXFER_DATA/cifar100``,
shared by both benchmarks. :func:`download_cifar100` fetches and verifies the
official archive.

The pickles are read with an allow-list (numpy arrays and plain containers),
so a data file cannot run code. At 32x32 the pixels are used as stored; any
other size is resized with Pillow (no disk cache: the pickles are already one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metaxfer.data.fewshot_io import (
    BenchmarkImages,
    as_text,
    check_split,
    decode_images,
    download_and_extract,
    files_fingerprint,
    load_data_pickle,
    make_preprocess,
    packaged_split_file,
    pickle_get,
    read_name_list,
    resolve_benchmark_root,
)
from metaxfer.data.images import ImagePreprocess
from metaxfer.errors import DataError

logger = logging.getLogger(__name__)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
#: Checksums of the official archive (169,001,437 bytes); the same values are in torchvision and Keras.
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_SHA256 = "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
CIFAR100_FOLDER = "cifar-100-python"
#: ``$METAXFER_DATA`` sub-folder shared by CIFAR-FS and FC100.
DATA_DIR = "cifar100"

#: The CIFAR-100 taxonomy: superclass (coarse label) -> its 5 classes (fine labels), both in id order.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": (
        "clock",
        "keyboard",
        "lamp",
        "telephone",
        "television",
    ),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": (
        "bridge",
        "castle",
        "house",
        "road",
        "skyscraper",
    ),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": (
        "camel",
        "cattle",
        "chimpanzee",
        "elephant",
        "kangaroo",
    ),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

SPLITS = ("train", "val", "test", "trainval")
#: Classes per split of each protocol.
SPLIT_CLASSES = {
    "cifar_fs": {"train": 64, "val": 16, "test": 20},
    "fc100": {"train": 60, "val": 20, "test": 20},
}
_HOW_TO_GET = (
    f"pass root= the folder holding {CIFAR100_FOLDER}/ (extracted from cifar-100-python.tar.gz), set "
    f"METAXFER_DATA so that it is in $METAXFER_DATA/{DATA_DIR}/, or fetch the official archive with "
    "metaxfer.data.cifar.download_cifar100(root)"
)

_DAMAGED = (
    "delete it and extract cifar-100-python.tar.gz again, or fetch the official archive with "
    "metaxfer.data.cifar.download_cifar100(root)"
)


def split_classes(
    protocol: str, split: str, split_dir: str | os.PathLike[str] | None = None
) -> list[str]:
    """The CIFAR-100 class names of one split, sorted.

    Args:
        protocol: ``"cifar_fs"`` or ``"fc100"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        split_dir: folder with ``train.txt`` / ``val.txt`` / ``test.txt`` that
            replaces the packaged lists.

    Raises:
        ConfigError: unknown split. DataError: unreadable split file.
    """
    names: list[str] = []
    for part in check_split(protocol, split, SPLITS):
        src = (
            Path(split_dir) / f"{part}.txt"
            if split_dir is not None
            else packaged_split_file(protocol, part)
        )
        names += read_name_list(src)
    return sorted(set(names))


def find_cifar100_folder(root: Path) -> Path:
    """``root/cifar-100-python`` or ``root`` itself, whichever holds ``meta``, ``train`` and ``test``.

    Raises:
        DataError: when neither does, saying how to get the files.
    """
    for folder in (root / CIFAR100_FOLDER, root):
        if all((folder / f).is_file() for f in ("meta", "train", "test")):
            return folder
    folder = root / CIFAR100_FOLDER if (root / CIFAR100_FOLDER).is_dir() else root
    missing = [f for f in ("meta", "train", "test") if not (folder / f).is_file()]
    hint = ""
    if (root / "cifar-100-python.tar.gz").is_file():
        hint = f" ({root / 'cifar-100-python.tar.gz'} is there: extract it with `tar xzf cifar-100-python.tar.gz`)"
    raise DataError(
        f"CIFAR-100 python files not found: {folder} has no {', '.join(missing)}{hint}. To fix: {_HOW_TO_GET}."
    )


def _read_part(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``uint8 [N, 3, 32, 32]`` images, fine and coarse labels of one CIFAR-100 pickle."""
    what = _DAMAGED
    data = load_data_pickle(path, what)
    images = np.asarray(pickle_get(data, "data", path))
    fine = (
        np.asarray(pickle_get(data, "fine_labels", path)).astype(np.int64).reshape(-1)
    )
    coarse = (
        np.asarray(pickle_get(data, "coarse_labels", path)).astype(np.int64).reshape(-1)
    )
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path}: 'data' is {images.dtype} {images.shape}, not uint8 [N, 3072]; {what}"
        )
    if len(fine) != len(images) or len(coarse) != len(images):
        raise DataError(
            f"{path}: {len(images)} images but {len(fine)} fine / {len(coarse)} coarse labels; {what}"
        )
    return images.reshape(-1, 3, 32, 32), fine, coarse


class CIFAR100FewShot(BenchmarkImages):
    """A class split of CIFAR-100 in memory: ``float32 [3, H, W]`` images, 600 per class.

    Use :class:`CIFARFS` or :class:`FC100`, which fix ``protocol``.

    Args:
        root: folder holding ``cifar-100-python/`` (or that folder); default ``$METAXFER_DATA/cifar100``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        image_size: output side (or ``(height, width)``); 32 keeps the stored pixels.
        resample: Pillow resize filter when ``image_size`` is not 32.
        preprocess: an :class:`ImagePreprocess` (or its dict) replacing ``image_size`` / ``resample``.
        split_dir: folder with ``train.txt`` / ``val.txt`` / ``test.txt`` class
            lists replacing the packaged ones.

    Attributes:
        labels: ``int64 [N]`` class id per example (examples grouped by class:
            its ``train`` images, then its ``test`` images, in file order).
        class_names: CIFAR-100 fine label names, sorted (class id = index).
        superclasses: the CIFAR-100 superclass of each class, from the data's coarse labels.

    Raises:
        DataError: missing or damaged pickles (named), or a split list naming a
            class that the ``meta`` file does not have.
        ConfigError: an unknown split.
    """

    name = "cifar100_fewshot"
    protocol = ""
    title = "CIFAR-100"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        image_size: int | Sequence[int] = 32,
        resample: str = "bilinear",
        preprocess: ImagePreprocess | dict[str, Any] | None = None,
        split_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        wanted = split_classes(self.protocol, split, split_dir)
        self.split = split
        self.preprocess = make_preprocess(preprocess, image_size, resample)
        self.root = resolve_benchmark_root(
            root, DATA_DIR, f"{CIFAR100_FOLDER}/ with meta, train and test", self.title
        )
        folder = find_cifar100_folder(self.root)
        meta_path = folder / "meta"
        meta = load_data_pickle(meta_path, _DAMAGED)
        fine_names = [
            as_text(s) for s in pickle_get(meta, "fine_label_names", meta_path)
        ]
        coarse_names = [
            as_text(s) for s in pickle_get(meta, "coarse_label_names", meta_path)
        ]
        unknown = [c for c in wanted if c not in fine_names]
        if unknown:
            where = (
                split_dir
                if split_dir is not None
                else f"metaxfer/data/splits/{self.protocol}"
            )
            raise DataError(
                f"the {self.protocol} {split!r} class list ({where}) names classes that {meta_path} does not have: "
                f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; use the official CIFAR-100 files, "
                "or fix the class list"
            )
        parts = [_read_part(folder / name) for name in ("train", "test")]
        images = np.concatenate([p[0] for p in parts])
        fine = np.concatenate([p[1] for p in parts])
        coarse = np.concatenate([p[2] for p in parts])
        if fine.size and (fine.min() < 0 or fine.max() >= len(fine_names)):
            raise DataError(
                f"{folder}: fine labels outside 0..{len(fine_names) - 1}; the files do not match {meta_path}"
            )
        new_label = np.full(len(fine_names), -1, dtype=np.int64)
        new_label[[fine_names.index(c) for c in wanted]] = np.arange(len(wanted))
        mapped = new_label[fine]
        keep = np.flatnonzero(mapped >= 0)
        keep = keep[np.argsort(mapped[keep], kind="stable")]
        self.labels = torch.from_numpy(mapped[keep])
        self.class_names = wanted
        counts = np.bincount(mapped[keep], minlength=len(wanted))
        if (counts == 0).any():
            empty = [wanted[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(
                f"{folder} holds no images of {', '.join(empty[:5])}; use the official CIFAR-100 files"
            )
        self.superclasses = []
        for c in range(len(wanted)):
            first = keep[int(np.searchsorted(mapped[keep], c))]
            g = int(coarse[first])
            self.superclasses.append(
                coarse_names[g] if 0 <= g < len(coarse_names) else str(g)
            )
        self._pixels = self._to_pixels(images[keep])
        fingerprint = files_fingerprint(
            folder, [meta_path, folder / "train", folder / "test"]
        )
        self._record = {
            "protocol": self.protocol,
            "files_fingerprint": fingerprint[:16],
        }
        logger.info(
            "%s %s: %d images of %d classes from %s",
            self.protocol,
            split,
            len(self),
            self.num_classes,
            folder,
        )

    def _to_pixels(self, images: np.ndarray) -> Tensor:
        pre = self.preprocess
        if pre.mode == "RGB" and pre.height_width == (32, 32):
            return torch.from_numpy(np.ascontiguousarray(images))
        # Through Pillow, so that preprocess([PIL image]) of a user's picture gives the same tensor.
        hwc = images.transpose(0, 2, 3, 1)
        return decode_images(
            len(hwc),
            lambda i: Image.fromarray(hwc[i]),
            pre,
            f"resizing {self.protocol}",
        )


class CIFARFS(CIFAR100FewShot):
    """CIFAR-FS: 64 / 16 / 20 CIFAR-100 classes, 600 images each, 32x32 RGB.

    Bertinetto, Henriques, Torr & Vedaldi, "Meta-learning with differentiable
    closed-form solvers", ICLR 2019. Arguments as in :class:`CIFAR100FewShot`.

    Example:
        >>> train = CIFARFS(root="/data/cifar100", split="train")   # 64 classes x 600
        >>> EpisodeSampler(train, ways=5, shots=1, queries=15).sample_batch(1).support_x.shape
        torch.Size([1, 5, 3, 32, 32])
    """

    name = "cifar_fs"
    protocol = "cifar_fs"
    title = "CIFAR-FS"


class FC100(CIFAR100FewShot):
    """FC100: CIFAR-100 split by superclass, 12 / 4 / 4 superclasses = 60 / 20 / 20 classes, 32x32 RGB.

    Oreshkin, Rodriguez & Lacoste, "TADAM: Task dependent adaptive metric for
    improved few-shot learning", NeurIPS 2018. Arguments as in :class:`CIFAR100FewShot`.

    Example:
        >>> test = FC100(root="/data/cifar100", split="test")   # 20 classes, 4 superclasses
        >>> sorted(set(test.superclasses))
        ['aquatic_mammals', 'insects', 'medium_mammals', 'people']
    """

    name = "fc100"
    protocol = "fc100"
    title = "FC100"


def download_cifar100(
    root: str | os.PathLike[str], *, force: bool = False, timeout: float = 60.0
) -> Path:
    """Download the official ``cifar-100-python.tar.gz`` into ``root`` and extract ``cifar-100-python/``.

    The archive's MD5 and sha256 (:data:`CIFAR100_MD5`, :data:`CIFAR100_SHA256`)
    are checked before it is renamed into place; an already extracted folder is
    left alone unless ``force``.

    Args:
        root: destination; use it as ``CIFARFS(root=root)`` / ``FC100(root=root)``.
        force: download and extract again even when the files exist.
        timeout: socket timeout in seconds.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: network error, checksum mismatch or a damaged archive.
    """
    return download_and_extract(
        CIFAR100_URL,
        root,
        [f"{CIFAR100_FOLDER}/{f}" for f in ("meta", "train", "test")],
        md5=CIFAR100_MD5,
        sha256=CIFAR100_SHA256,
        force=force,
        timeout=timeout,
    )
