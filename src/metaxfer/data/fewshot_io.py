"""Shared plumbing of the on-disk few-shot benchmarks (miniImageNet, tieredImageNet, CIFAR-FS, FC100, CUB).

* :class:`BenchmarkImages` - the :class:`~metaxfer.data.images.PixelDataset` base of
  those datasets (``describe``, ``tensors``, ``repr``).
* :func:`resolve_benchmark_root` - ``root=`` or ``$METAXFER_DATA/<name>``, checked to
  be a folder, with an error that says what the folder must hold.
* :func:`decode_files` / :func:`cached_pixels` - decode image files through an
  :class:`~metaxfer.data.images.ImagePreprocess` once, then keep the ``uint8``
  pixels in a safetensors cache (``$METAXFER_CACHE/<name>``) keyed by a
  fingerprint of the source files (names, sizes, modification times) and the
  decode settings. A changed, added or removed file changes the key.
* :func:`load_data_pickle` - unpickle CIFAR / tieredImageNet data files with an
  allow-list of globals (numpy arrays only), so a data file cannot run code.
* :func:`download_archive` / :func:`extract_archive` / :func:`download_and_extract` -
  verified downloads of official archives (never called by the tests).

Decoding policy: these are benchmarks, so a corrupted or missing image is an
error naming the file (dropping it silently would change the benchmark), unlike
:class:`~metaxfer.data.image_folder.ImageFolder`, which skips it with a warning.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaxfer.data.download import fetch_verified
from metaxfer.data.image_folder import as_preprocess, list_images, open_image
from metaxfer.data.images import (
    ImagePreprocess,
    PixelDataset,
    decode_images,
    read_pixel_cache,
    write_pixel_cache,
)
from metaxfer.data.paths import DATA_ENV, resolve_data_root
from metaxfer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Bump when the cache layout or decode recipe changes: older cache files are then ignored.
CACHE_FORMAT = 1


# ---------------------------------------------------------------- roots, preprocess, splits


def resolve_benchmark_root(
    root: str | os.PathLike[str] | None,
    dataset: str,
    layout: str,
    title: str | None = None,
) -> Path:
    """The data folder of ``dataset``: ``root`` or ``$METAXFER_DATA/<dataset>``, which must exist.

    Args:
        root: explicit folder (wins over the environment).
        dataset: sub-folder of ``$METAXFER_DATA``.
        layout: what the folder must hold, e.g. ``"train.csv, val.csv, test.csv and images/"``.
        title: the benchmark's name in messages (default ``dataset``).

    Raises:
        DataError: no root given and ``METAXFER_DATA`` unset, or the folder is
            missing or a file; the message names the folder and the layout.
    """
    title = title or dataset
    try:
        folder = resolve_data_root(root, dataset)
    except DataError:
        raise DataError(
            f"no data root for {title}: pass root= the folder holding {layout}, "
            f"or set {DATA_ENV} so that these are in ${DATA_ENV}/{dataset}/"
        ) from None
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        via = f" (from ${DATA_ENV})" if root is None else ""
        raise DataError(
            f"{title} data folder {folder}{via} {what}; pass root= the folder holding {layout}"
        )
    return folder


def make_preprocess(
    preprocess: ImagePreprocess | dict[str, Any] | None,
    image_size: int | Sequence[int],
    resample: str,
) -> ImagePreprocess:
    """``preprocess`` (an :class:`ImagePreprocess` or its dict) or RGB at ``image_size`` without inversion."""
    return as_preprocess(preprocess, image_size, "RGB", False, resample)


def check_split(dataset: str, split: str, splits: Sequence[str]) -> tuple[str, ...]:
    """The parts of ``split`` (``"trainval"`` -> ``("train", "val")``).

    Raises:
        ConfigError: for a split not in ``splits``.
    """
    if split not in splits:
        raise ConfigError(
            f"unknown split {split!r} for {dataset}; choose one of: {', '.join(splits)}"
        )
    return ("train", "val") if split == "trainval" else (split,)


def read_name_list(path: Path | Any) -> list[str]:
    """Non-empty, non-comment (``#``) lines of a text file, stripped.

    Args:
        path: a :class:`~pathlib.Path` or an ``importlib.resources`` Traversable.

    Raises:
        DataError: naming the file when it cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"class list {path} cannot be read ({type(e).__name__}: {e}); "
            "reinstall metaxfer (it ships data/splits/) or pass a readable split_dir"
        ) from None
    return [
        s.strip()
        for s in text.splitlines()
        if s.strip() and not s.lstrip().startswith("#")
    ]


def packaged_split_file(protocol: str, split: str) -> Any:
    """The packaged class list ``metaxfer/data/splits/<protocol>/<split>.txt`` (a Traversable)."""
    return resources.files("metaxfer.data").joinpath("splits", protocol, f"{split}.txt")


def class_folders(folder: Path, dataset: str) -> tuple[list[str], list[list[Path]]]:
    """Class sub-folders of ``folder`` (sorted) and the images in each (sorted, recursive).

    Raises:
        DataError: no class folders, or a class folder without images (named).
    """
    dirs = sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    if not dirs:
        raise DataError(
            f"{folder} has no class folders; {dataset} expects {folder}/CLASS_NAME/image.jpg"
        )
    files = [list_images(d) for d in dirs]
    empty = [str(d) for d, f in zip(dirs, files) if not f]
    if empty:
        raise DataError(
            f"{dataset} class folder(s) without images: {', '.join(empty[:5])}"
            f"{f' ... ({len(empty)} in all)' if len(empty) > 5 else ''}; "
            "restore their images from your copy of the data, or remove the empty folders"
        )
    return [d.name for d in dirs], files


def check_disjoint(new: Iterable[str], names: Iterable[str], root: Path) -> None:
    """Raise when the classes ``new`` of one split part repeat classes ``names`` of an earlier part (trainval).

    Raises:
        DataError: naming the shared classes and ``root``.
    """
    clash = sorted(set(new) & set(names))
    if clash:
        raise DataError(
            f"classes {', '.join(clash[:5])} appear in both the train and val split of "
            f"{root}; the splits must be class-disjoint"
        )


def nested_hint(root: Path, relative: str) -> str:
    """`` (found X: did you mean root=Y?)`` when ``root/<child>/<relative>`` exists one level down."""
    if not root.is_dir():
        return ""
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if (child / relative).exists():
            return f" (found {child / relative}: did you mean root={str(child)!r}?)"
    return ""


# ---------------------------------------------------------------- dataset base


class BenchmarkImages(PixelDataset):
    """Common surface of the few-shot benchmark datasets (in-memory ``uint8`` pixels).

    Subclasses set ``name``, ``split``, ``root``, ``preprocess``, ``_pixels``
    (``uint8 [N, C, H, W]``), ``labels`` (``int64 [N]``, class ids
    ``0..num_classes-1``) and ``class_names``; ``_record`` adds dataset-specific
    fields to :meth:`describe`.
    """

    name = "benchmark"
    split: str
    root: Path
    _record: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What identifies this data in a result record (JSON-friendly)."""
        names = hashlib.sha256("\n".join(self.class_names).encode()).hexdigest()[:16]
        return {
            "dataset": self.name,
            "split": self.split,
            "root": str(self.root),
            "classes": self.num_classes,
            "examples": len(self),
            "class_names_sha256": names,
            "preprocess": self.preprocess.to_dict(),
            **getattr(self, "_record", {}),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, classes={self.num_classes}, "
            f"examples={len(self)}, root={str(self.root)!r})"
        )


def group_by_class(
    class_names: Sequence[str], per_class: Sequence[Sequence[Any]]
) -> tuple[list[str], list[Any], Tensor]:
    """Sort classes by name and flatten: ``(names, items, labels)`` with ``labels`` ``int64 [N]``."""
    order = sorted(range(len(class_names)), key=lambda i: class_names[i])
    names = [class_names[i] for i in order]
    items = [x for i in order for x in per_class[i]]
    counts = torch.tensor([len(per_class[i]) for i in order], dtype=torch.long)
    labels = torch.arange(len(order)).repeat_interleave(counts)
    return names, items, labels


# ---------------------------------------------------------------- decoding and the disk cache


def files_fingerprint(root: Path, files: Iterable[Path], extra: str = "") -> str:
    """sha256 of each file's path relative to ``root``, size and modification time (no content is read).

    Raises:
        DataError: naming the first file that does not exist.
    """
    h = hashlib.sha256(extra.encode())
    for f in files:
        try:
            st = f.stat()
        except OSError as e:
            raise DataError(
                f"{f} cannot be read ({type(e).__name__}: {e}); restore the file"
            ) from None
        try:
            name = f.relative_to(root).as_posix()
        except ValueError:
            name = f.as_posix()
        h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def decode_files(
    files: Sequence[Path], preprocess: ImagePreprocess, desc: str
) -> Tensor:
    """Decode ``files`` through ``preprocess.to_pixels``: ``uint8 [len(files), C, H, W]``.

    Raises:
        DataError: naming the first unreadable image.
    """
    return decode_images(len(files), lambda i: open_image(files[i]), preprocess, desc)


def cached_pixels(
    cache_dir: Path | None,
    stem: str,
    fingerprint: str,
    preprocess: ImagePreprocess,
    count: int,
    decode: Callable[[], Tensor],
) -> Tensor:
    """Pixels from ``cache_dir/<stem>-<fingerprint>-<decode key>.safetensors``, else ``decode()`` (then cached).

    Args:
        cache_dir: cache folder, or None for no disk cache.
        stem: dataset and split, e.g. ``"mini_imagenet-train"``.
        fingerprint: hex digest identifying the source files (see :func:`files_fingerprint`).
        preprocess: decode settings (only :meth:`ImagePreprocess.to_pixels` matters).
        count: number of images expected.
        decode: produces ``uint8 [count, C, H, W]`` on a cache miss.
    """
    h, w = preprocess.height_width
    shape = (count, preprocess.channels, h, w)
    file = None
    if cache_dir is not None:
        key = preprocess.decode_key()
        file = (
            cache_dir / f"{stem}-{fingerprint[:16]}-{key}-v{CACHE_FORMAT}.safetensors"
        )
        pixels = _read_cache(file, fingerprint, key, shape)
        if pixels is not None:
            return pixels
    pixels = decode()
    if tuple(pixels.shape) != shape or pixels.dtype != torch.uint8:
        raise AssertionError(
            f"decoded {tuple(pixels.shape)} {pixels.dtype}, expected {shape} uint8"
        )
    if file is not None:
        _write_cache(file, pixels, fingerprint, preprocess.decode_key())
    return pixels


def _read_cache(
    file: Path, fingerprint: str, key: str, shape: tuple[int, ...]
) -> Tensor | None:
    def parse(meta: dict[str, str], pixels: Tensor) -> Tensor | None:
        ok = (
            meta.get("format") == str(CACHE_FORMAT)
            and meta.get("fingerprint") == fingerprint
            and meta.get("decode_key") == key
            and pixels.dtype == torch.uint8
            and tuple(pixels.shape) == shape
        )
        return pixels if ok else None

    pixels = read_pixel_cache(file, parse, stacklevel=4)
    if pixels is not None:
        logger.info("loaded decoded images from cache %s", file)
    return pixels


def _write_cache(file: Path, pixels: Tensor, fingerprint: str, key: str) -> None:
    meta = {"format": str(CACHE_FORMAT), "fingerprint": fingerprint, "decode_key": key}
    write_pixel_cache(file, pixels, meta, stacklevel=4)


# ---------------------------------------------------------------- pickles


_NUMPY2 = int(np.__version__.split(".")[0]) >= 2
#: The only globals a data pickle may name: what numpy arrays, numpy scalars and protocol-2 bytes need.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _DataUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; anything else (``os.system``, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a data file"
            )
        if module.startswith(("numpy.core", "numpy._core")):
            # numpy 1 pickles name numpy.core, numpy 2 pickles numpy._core; either loads on either numpy
            # (importing numpy.core on numpy 2 is deprecated, so try numpy._core there first).
            tail = module.split(".", 2)[2]
            order = (
                ("numpy._core.", "numpy.core.")
                if _NUMPY2
                else ("numpy.core.", "numpy._core.")
            )
            for prefix in order:
                try:
                    return getattr(importlib.import_module(prefix + tail), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def load_data_pickle(path: Path, what: str) -> Any:
    """Unpickle a data file (Python 2 pickles too: ``latin1``) allowing numpy arrays and plain containers only.

    Args:
        path: the pickle.
        what: how to get a good copy, appended to error messages.

    Raises:
        DataError: naming the file when it is missing, truncated, not a pickle,
            or names a global other than numpy's array machinery.
    """
    if not path.is_file():
        raise DataError(f"{path} not found; {what}")
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        MemoryError,
        OSError,
    ) as e:
        raise DataError(
            f"{path} is not a readable data pickle, it is truncated or corrupted ({type(e).__name__}: {e}); "
            f"{what}"
        ) from None


def pickle_get(data: Any, key: str, path: Path) -> Any:
    """``data[key]`` for a dict unpickled from Python 2 or 3 (``str`` or ``bytes`` keys).

    Raises:
        DataError: naming the file when ``data`` is not a dict or lacks ``key``.
    """
    if isinstance(data, dict):
        for k in (key, key.encode()):
            if k in data:
                return data[k]
        keys = ", ".join(
            sorted(k.decode() if isinstance(k, bytes) else str(k) for k in data)
        )
        raise DataError(
            f"{path} has no {key!r} entry (it has: {keys}); is it the right file?"
        )
    raise DataError(
        f"{path} holds a {type(data).__name__}, not a dict with {key!r}; is it the right file?"
    )


def as_text(value: Any) -> str:
    """A name from a pickle: ``bytes`` and Python 2 ``str`` (read as latin1) decoded as UTF-8 where possible."""
    if isinstance(value, bytes):
        raw = value
    else:
        text = str(value)
        try:
            raw = text.encode("latin1")
        except UnicodeEncodeError:
            return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin1")


# ---------------------------------------------------------------- downloads


def download_archive(
    url: str,
    folder: Path,
    *,
    md5: str,
    sha256: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` into ``folder`` (checked against ``md5`` and ``sha256``, renamed into place when good).

    An existing file is kept unless ``force``. Returns the archive path.

    Raises:
        DataError: network error or checksum mismatch (nothing is left under the real name).
    """
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / url.rsplit("/", 1)[-1].split("?", 1)[0]
    if dest.exists() and not force:
        return dest
    fetch_verified(url, dest, md5=md5, sha256=sha256, timeout=timeout)
    return dest


def extract_archive(archive: Path, folder: Path) -> None:
    """Extract a (gzipped) tar into ``folder``, refusing members that would land outside it.

    Raises:
        DataError: naming the archive when it is not a readable tar file.
    """
    try:
        with tarfile.open(archive, "r:*") as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(folder, filter="data")
            else:  # Python without PEP 706 filters: check the paths ourselves
                base = folder.resolve()
                for m in tf.getmembers():
                    target = (folder / m.name).resolve()
                    if (
                        base != target
                        and base not in target.parents
                        or m.issym()
                        or m.islnk()
                    ):
                        raise DataError(
                            f"{archive} member {m.name} would be written outside {folder}; not extracting"
                        )
                tf.extractall(folder)  # members checked above
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(
            f"{archive} cannot be extracted ({type(e).__name__}: {e}); it is truncated or corrupted: "
            "delete it and download it again"
        ) from None


def download_and_extract(
    url: str,
    root: str | os.PathLike[str],
    extracted: Sequence[str],
    *,
    md5: str,
    sha256: str | None = None,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """:func:`download_archive` ``url`` into ``root``, then :func:`extract_archive` it there; returns ``root``.

    Unless ``force``, nothing is done when every path of ``extracted`` (relative to ``root``: files,
    or folders with a trailing ``/``) exists.

    Raises:
        DataError: network error, checksum mismatch or a damaged archive.
    """
    folder = Path(root).expanduser()
    present = ((folder / p).is_dir() if p.endswith("/") else (folder / p).is_file() for p in extracted)
    if not force and all(present):
        return folder
    archive = download_archive(url, folder, md5=md5, sha256=sha256, force=force, timeout=timeout)
    extract_archive(archive, folder)
    return folder


def load_file_pixels(
    files: Sequence[Path],
    root: Path,
    preprocess: ImagePreprocess,
    cache_dir: Path | None,
    stem: str,
) -> tuple[Tensor, str]:
    """Pixels of ``files`` (``uint8 [len(files), C, H, W]``), from the cache or decoded, and their fingerprint.

    Raises:
        DataError: naming a missing or unreadable image.
    """
    fingerprint = files_fingerprint(root, files)
    pixels = cached_pixels(
        cache_dir,
        stem,
        fingerprint,
        preprocess,
        len(files),
        lambda: decode_files(files, preprocess, f"decoding {stem}"),
    )
    return pixels, fingerprint
