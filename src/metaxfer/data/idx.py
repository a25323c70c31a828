"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017) from their IDX files.

Both ship as four IDX files, gzipped or raw::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

IDX (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code
(0x08 = uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64),
the number of dimensions, one big-endian uint32 per dimension, then the
values, big-endian, in C order. A file shorter than its header says is a
:class:`~metaxfer.errors.DataError` naming the file.

The data root is ``root=``, else ``$METAXFER_DATA/fashion_mnist`` (or
``mnist``), else the Debian package location (``apt-get install
dataset-fashion-mnist`` puts Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``).
With 10 classes these are few-shot *test-bed* datasets (5-way tasks over
all 10 classes), not meta-training sets with disjoint class splits.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metaxfer.data.images import ImagePreprocess, PixelDataset
from metaxfer.data.paths import DATA_ENV
from metaxfer.errors import ConfigError, DataError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"

#: Split -> IDX file stem prefix.
SPLIT_PREFIX = {"train": "train", "test": "t10k"}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]

#: Where Debian's packages put the files (``dpkg -L dataset-fashion-mnist``).
DEBIAN_ROOTS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist"), "mnist": Path("/usr/share/datasets/mnist")}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip detected from its first bytes, not its name).

    Returns:
        An array with the file's shape, in native byte order.

    Raises:
        DataError: naming the file when it is missing, not IDX, or truncated.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {p}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{p} is not a readable gzip file, it is truncated or corrupted ({type(e).__name__}: {e}); "
                        "download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{p} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'}); "
                        "give the original MNIST-format file")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p} is truncated: its header is cut off ({len(raw)} bytes); download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{p} is {state}: shape {shape} needs {expected} bytes, the file has {len(raw)}; "
                        "download it again")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(root: Path, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem`` (also the ``stem.idx3-ubyte`` style with a dot).

    Raises:
        DataError: listing what was looked for.
    """
    candidates = [root / f"{stem}.gz", root / stem, root / f"{stem.replace('-idx', '.idx')}.gz", root / stem.replace("-idx", ".idx")]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"{root} has no {stem}.gz or {stem}; put the four IDX files there (gzipped or raw) or pass root=")


def resolve_idx_root(root: str | os.PathLike[str] | None, dataset: str) -> Path:
    """``root``, else ``$METAXFER_DATA/<dataset>`` when that folder exists, else the Debian location.

    Raises:
        DataError: when none of them exists, saying how to get the files.
    """
    if root is not None:
        return Path(root).expanduser()
    tried = []
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        p = Path(env).expanduser() / dataset
        if p.is_dir():
            return p
        tried.append(str(p))
    debian = DEBIAN_ROOTS[dataset]
    if debian.is_dir():
        return debian
    tried.append(str(debian))
    apt = " or `apt-get install dataset-fashion-mnist`" if dataset == "fashion_mnist" else ""
    raise DataError(f"no {dataset} data found (looked in {', '.join(tried)}); pass root= (the folder of the four IDX "
                    f"files), set {DATA_ENV} so that they are in ${DATA_ENV}/{dataset}/{apt}")


class IDXImages(PixelDataset):
    """MNIST-format images and labels in memory, ``float32 [1, H, W]`` per example.

    Args:
        root: folder of the four IDX files; default see module docstring.
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        dataset: ``"fashion_mnist"`` or ``"mnist"`` (default root and class names).
        image_size: output side; 28 keeps the original pixels, any other size
            resizes every image with Pillow through :class:`ImagePreprocess`.
        invert: map ``v -> 1 - v``; MNIST is already white on black, so False.
        resample: Pillow filter when resizing.

    Attributes:
        labels: ``int64 [N]``; class_names: the 10 names; preprocess: the
            :class:`ImagePreprocess` (``ImagePreprocess.from_dict(data.preprocess.to_dict())``
            turns a user's PNG into the same tensors).

    Raises:
        DataError: missing, non-IDX or truncated files (named), or images and
            labels of different lengths.
        ConfigError: an unknown split or dataset.

    Example:
        >>> test = IDXImages(split="test", dataset="fashion_mnist")
        >>> test.gather(torch.tensor([0, 1])).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, split: str = "train", dataset: str = "fashion_mnist",
                 image_size: int = 28, invert: bool = False, resample: str = "lanczos") -> None:
        if split not in SPLIT_PREFIX:
            raise ConfigError(f"unknown split {split!r} for {dataset}; choose one of: {', '.join(SPLIT_PREFIX)}")
        if dataset not in DEBIAN_ROOTS:
            raise ConfigError(f"unknown IDX dataset {dataset!r}; choose one of: {', '.join(DEBIAN_ROOTS)}")
        self.name, self.split = dataset, split
        self.root = resolve_idx_root(root, dataset)
        prefix = SPLIT_PREFIX[split]
        self.image_file = find_idx_file(self.root, f"{prefix}-images-idx3-ubyte")
        self.label_file = find_idx_file(self.root, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(self.image_file)
        labels = read_idx(self.label_file)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{self.image_file} holds {images.dtype} {images.shape}, not uint8 [N, H, W] images")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{self.label_file} holds {labels.shape} labels for {len(images)} images in "
                            f"{self.image_file}; use the matching pair of files")
        self.preprocess = ImagePreprocess(size=int(image_size), mode="L", invert=invert, resample=resample)
        pixels = torch.from_numpy(images.copy())[:, None]  # uint8 [N, 1, H, W]
        if tuple(pixels.shape[-2:]) != self.preprocess.height_width:
            # Through Pillow, so that preprocess([PIL image]) of a user's picture gives the same tensor.
            pixels = self.preprocess.to_pixels([Image.fromarray(a) for a in images])
        self._pixels = pixels.contiguous()
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.class_names = list(FASHION_MNIST_CLASSES if dataset == "fashion_mnist" else MNIST_CLASSES)
        if int(self.labels.max()) >= len(self.class_names) or int(self.labels.min()) < 0:
            raise DataError(f"{self.label_file} has labels outside 0..{len(self.class_names) - 1}; is it a label file of {dataset}?")

    def describe(self) -> dict[str, Any]:
        """What identifies this data in a result record (JSON-friendly)."""
        return {"dataset": self.name, "split": self.split, "root": str(self.root), "classes": self.num_classes,
                "examples": len(self), "files": [self.image_file.name, self.label_file.name],
                "preprocess": self.preprocess.to_dict()}

    def __repr__(self) -> str:
        return f"IDXImages(dataset={self.name!r}, split={self.split!r}, examples={len(self)}, root={str(self.root)!r})"


def FashionMNIST(root: str | os.PathLike[str] | None = None, split: str = "train", **kwargs: Any) -> IDXImages:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 10 clothing classes, 28x28 grayscale."""
    return IDXImages(root=root, split=split, dataset="fashion_mnist", **kwargs)


def MNIST(root: str | os.PathLike[str] | None = None, split: str = "train", **kwargs: Any) -> IDXImages:
    """MNIST (LeCun et al. 1998): handwritten digits 0-9, 28x28 grayscale."""
    return IDXImages(root=root, split=split, dataset="mnist", **kwargs)
