"""Omniglot (Lake et al., Science 2015) read straight from the official zips.

The data root holds ``images_background.zip`` (30 alphabets, 964 characters)
and ``images_evaluation.zip`` (20 alphabets, 659 characters) in the official
layout ``images_background/ALPHABET/characterNN/XXXX_YY.png`` (105x105, 1-bit).
PNGs are read from the zips with :mod:`zipfile`; nothing is extracted.

Protocols:

* ``"vinyals"`` (Vinyals et al. 2016, Snell et al. 2017): 1028 train / 172 val /
  423 test characters drawn from all 1623, every character also rotated by
  90/180/270 degrees as a separate class. The character lists are package data
  (``metaxfer/data/splits/omniglot_vinyals/*.txt``, made by
  ``scripts/make_omniglot_splits.py``; see that script for why they are a
  seeded random split and not the original files). Splits: train, val, test,
  trainval (= train + val).
* ``"lake"``: the background alphabets are "train", the evaluation alphabets
  are "test"; no rotations by default.

Decoding (once, ~5-30 s for all 32,460 PNGs) goes through
:class:`~metaxfer.data.images.ImagePreprocess`: Pillow convert("L"), resize
with LANCZOS (the MAML / cbfinn recipe), scale to ``[0, 1]``, invert so that
strokes are 1 and paper is 0 (as in the ProtoNet code). The resized ``uint8``
pixels of each zip are cached on disk (safetensors, no pickle) in
``$METAXFER_CACHE/omniglot`` or ``~/.cache/metaxfer/omniglot``, keyed by the
zip's sha256, the decode settings and :data:`FORMAT_VERSION`, so a changed zip
is never served from a stale cache. Within one process each zip is decoded or
loaded at most once, whichever splits are built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from metaxfer.data.image_folder import open_png_bytes
from metaxfer.data.images import ImagePreprocess, PixelDataset, decode_images, read_pixel_cache, write_pixel_cache
from metaxfer.data.paths import cache_folder, resolve_data_root
from metaxfer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

#: Bump when the cache file layout or the decode recipe changes: old caches are then ignored.
FORMAT_VERSION = 1

BACKGROUND_ZIP = "images_background.zip"
EVALUATION_ZIP = "images_evaluation.zip"
ZIP_NAMES = (BACKGROUND_ZIP, EVALUATION_ZIP)

PROTOCOLS = ("vinyals", "lake")
SPLITS = {"vinyals": ("train", "val", "test", "trainval"), "lake": ("train", "test")}
DEFAULT_ROTATIONS = {"vinyals": (0, 90, 180, 270), "lake": (0,)}
#: Characters per split of the vinyals protocol on the full data (1028 + 172 + 423 = 1623).
VINYALS_SIZES = {"train": 1028, "val": 172, "test": 423}

SplitFiles = str | os.PathLike | Mapping[str, str | os.PathLike | Sequence[str]]

_HOW_TO_GET = (
    "pass root= (the folder holding images_background.zip and images_evaluation.zip), "
    "set METAXFER_DATA (the zips then go in $METAXFER_DATA/omniglot/), "
    "or download the official zips with metaxfer.data.download_omniglot(root)"
)
_CHUNK = 512  # images opened per ImagePreprocess.to_pixels call while decoding


@dataclass
class DecodedZip:
    """The resized pixels of every PNG of one Omniglot zip.

    Attributes:
        zip_name: file name, e.g. ``"images_background.zip"``.
        sha256: hex sha256 of the zip bytes.
        pixels: ``uint8 [N, 1, H, W]``, strokes dark (not yet inverted).
        characters: sorted ``"ALPHABET/characterNN"`` names.
        counts: images per character, aligned with ``characters``.
        members: N zip member paths, in ``pixels`` order (by character, then name).
    """

    zip_name: str
    sha256: str
    pixels: Tensor
    characters: list[str]
    counts: list[int]
    members: list[str]


# ---------------------------------------------------------------- hashing and in-process memo

_SHA_MEMO: dict[tuple[str, int, int, int], str] = {}
_DECODED_MEMO: OrderedDict[tuple[str, str], DecodedZip] = OrderedDict()
_DECODED_MEMO_SIZE = 4  # two zips x two image sizes; 28 px is ~25 MB for both zips


def clear_memory_cache() -> None:
    """Forget zips decoded or loaded in this process (the disk cache is kept)."""
    _SHA_MEMO.clear()
    _DECODED_MEMO.clear()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, memoised per (path, size, mtime, inode) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _SHA_MEMO.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _SHA_MEMO[key] = h.hexdigest()
    return digest


# ---------------------------------------------------------------- zip reading

def _missing_zip_error(path: Path) -> DataError:
    where = f"the folder {path.parent} does not exist" if not path.parent.is_dir() else f"{path.parent} has no {path.name}"
    hint = ""
    nested = path.parent / "omniglot" / path.name
    if nested.is_file():
        hint = f" (found {nested}: did you mean root={str(path.parent / 'omniglot')!r}?)"
    return DataError(f"Omniglot file not found: {path} ({where}){hint}. To fix: {_HOW_TO_GET}.")


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise _missing_zip_error(path)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise DataError(
            f"{path} is not a readable zip file, it is truncated or corrupted ({type(e).__name__}: {e}). "
            f"Delete it and get it again: copy it again from its source or call "
            f"metaxfer.data.download_omniglot({str(path.parent)!r})."
        ) from e


def _scan(zf: zipfile.ZipFile, path: Path) -> tuple[list[str], list[int], list[str]]:
    """Characters, images per character and PNG members (sorted) of an open Omniglot zip."""
    top = path.stem  # "images_background" / "images_evaluation"
    by_char: dict[str, list[str]] = {}
    for name in zf.namelist():
        parts = name.split("/")
        # Official layout only: top/ALPHABET/characterNN/XXXX_YY.png; directory entries,
        # __MACOSX/ resource forks and stray files are skipped.
        if len(parts) != 4 or parts[0] != top or not parts[3].lower().endswith(".png") or parts[3].startswith("."):
            continue
        by_char.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
    if not by_char:
        raise DataError(
            f"{path} holds no PNGs in the official Omniglot layout {top}/ALPHABET/characterNN/XXXX_YY.png; "
            f"use the official {path.name} (metaxfer.data.download_omniglot(root)) or rebuild the zip in that layout."
        )
    characters = sorted(by_char)
    members = [m for c in characters for m in sorted(by_char[c])]
    return characters, [len(by_char[c]) for c in characters], members


def list_characters(path: str | os.PathLike[str]) -> list[str]:
    """Sorted ``"ALPHABET/characterNN"`` names in one Omniglot zip (no image is decoded).

    Raises:
        DataError: when the zip is missing, unreadable or not in the official layout.
    """
    p = Path(path)
    with _open_zip(p) as zf:
        return _scan(zf, p)[0]


def _read_image(zf: zipfile.ZipFile, path: Path, member: str) -> Image.Image:
    try:
        data = zf.read(member)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise DataError(
            f"{path}: member {member} cannot be read ({type(e).__name__}: {e}); the zip is corrupted. "
            f"Delete {path} and get it again (metaxfer.data.download_omniglot({str(path.parent)!r}) or a fresh copy)."
        ) from e
    return open_png_bytes(
        data,
        f"{path}: member {member}",
        f". The zip is damaged: delete {path} and get it again "
        f"(metaxfer.data.download_omniglot({str(path.parent)!r}) or a fresh copy).",
    )


def _decode_zip(path: Path, preprocess: ImagePreprocess, sha256: str) -> DecodedZip:
    """Decode every PNG of one zip through ``preprocess.to_pixels`` (the slow path, ~1 ms per image)."""
    with _open_zip(path) as zf:
        characters, counts, members = _scan(zf, path)
        pixels = decode_images(
            len(members), lambda i: _read_image(zf, path, members[i]), preprocess, f"decoding {path.name}", _CHUNK
        )
    return DecodedZip(path.name, sha256, pixels, characters, counts, members)


# ---------------------------------------------------------------- disk cache

def _cache_file(cache_dir: Path, path: Path, sha256: str, preprocess: ImagePreprocess) -> Path:
    return cache_dir / f"{path.stem}-{sha256[:16]}-{preprocess.decode_key()}-v{FORMAT_VERSION}.safetensors"


def _read_cache(file: Path, sha256: str, preprocess: ImagePreprocess, zip_name: str) -> DecodedZip | None:
    def parse(meta: dict[str, str], pixels: Tensor) -> DecodedZip | None:
        characters = json.loads(meta["characters"])
        counts = [int(c) for c in json.loads(meta["counts"])]
        members = json.loads(meta["members"])
        h, w = preprocess.height_width
        ok = (
            meta.get("format") == str(FORMAT_VERSION)
            and meta.get("zip_sha256") == sha256
            and meta.get("decode_key") == preprocess.decode_key()
            and pixels.dtype == torch.uint8
            and tuple(pixels.shape) == (len(members), preprocess.channels, h, w)
            and sum(counts) == len(members)
            and len(counts) == len(characters)
        )
        return DecodedZip(zip_name, sha256, pixels, characters, counts, members) if ok else None

    return read_pixel_cache(file, parse, "Omniglot cache", "the zip", "decoding the zip again", stacklevel=3)


def _write_cache(file: Path, decoded: DecodedZip, preprocess: ImagePreprocess) -> None:
    meta = {
        "format": str(FORMAT_VERSION),
        "zip_name": decoded.zip_name,
        "zip_sha256": decoded.sha256,
        "decode_key": preprocess.decode_key(),
        "characters": json.dumps(decoded.characters),
        "counts": json.dumps(decoded.counts),
        "members": json.dumps(decoded.members),
    }
    write_pixel_cache(file, decoded.pixels, meta, "Omniglot cache", stacklevel=3)


def load_zip(path: Path, preprocess: ImagePreprocess, cache_dir: Path | None) -> DecodedZip:
    """Pixels of one zip: from this process's memo, else the disk cache, else by decoding (then cached).

    Args:
        path: the zip file.
        preprocess: decode settings (only :meth:`ImagePreprocess.to_pixels` matters).
        cache_dir: folder of cache files, or None for no disk cache.
    """
    if not path.is_file():
        raise _missing_zip_error(path)
    sha256 = file_sha256(path)
    key = (sha256, preprocess.decode_key())
    decoded = _DECODED_MEMO.get(key)
    if decoded is not None:
        _DECODED_MEMO.move_to_end(key)
    else:
        file = _cache_file(cache_dir, path, sha256, preprocess) if cache_dir is not None else None
        decoded = _read_cache(file, sha256, preprocess, path.name) if file is not None else None
        if decoded is None:
            decoded = _decode_zip(path, preprocess, sha256)
            if file is not None:
                _write_cache(file, decoded, preprocess)
        _DECODED_MEMO[key] = decoded
        while len(_DECODED_MEMO) > _DECODED_MEMO_SIZE:
            _DECODED_MEMO.popitem(last=False)
    # Same bytes under another name (copied zip) still carry the right name in records.
    return decoded if decoded.zip_name == path.name else dataclasses.replace(decoded, zip_name=path.name)


# ---------------------------------------------------------------- splits

def _packaged_split_file(split: str) -> Any:
    return resources.files("metaxfer.data").joinpath("splits", "omniglot_vinyals", f"{split}.txt")


def _read_list(source: Any) -> list[str]:
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(
            f"split file {source} cannot be read ({type(e).__name__}); reinstall metaxfer (it ships data/splits/omniglot_vinyals/*.txt), "
            f"regenerate it with scripts/make_omniglot_splits.py, or pass split_files= to Omniglot"
        ) from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _split_characters(split: str, split_files: SplitFiles | None) -> tuple[list[str], list[str]]:
    """Characters of a vinyals split, and where they came from (for error messages)."""
    parts = ("train", "val") if split == "trainval" else (split,)
    if isinstance(split_files, Mapping) and split in split_files:
        parts = (split,)
    chars: list[str] = []
    sources: list[str] = []
    for part in parts:
        if split_files is None:
            src: Any = _packaged_split_file(part)
        elif isinstance(split_files, Mapping):
            if part not in split_files:
                raise ConfigError(f"split_files has no {part!r} entry; give {part!r} (a file path or a list of characters)")
            src = split_files[part]
        else:
            src = Path(split_files) / f"{part}.txt"
        if isinstance(src, (str, os.PathLike)):
            src = Path(src)
        if isinstance(src, Sequence) and not isinstance(src, (str, bytes)):
            chars.extend(str(c) for c in src)
            sources.append(f"split_files[{part!r}]")
        else:
            chars.extend(_read_list(src))
            sources.append(str(src))
    return sorted(set(chars)), sources


def _normalise_rotations(rotations: Sequence[int] | None, protocol: str) -> tuple[int, ...]:
    if rotations is None:
        return DEFAULT_ROTATIONS[protocol]
    if isinstance(rotations, int):
        rotations = (rotations,)
    out = sorted({int(r) % 360 for r in rotations})
    if not out or any(r % 90 for r in out):
        raise ConfigError(f"rotations must be a non-empty list of multiples of 90 degrees, e.g. (0, 90, 180, 270); got {rotations!r}")
    return tuple(out)


# ---------------------------------------------------------------- dataset

class Omniglot(PixelDataset):
    """Omniglot characters as an in-memory dataset of ``float32 [1, H, W]`` images.

    Args:
        root: folder holding ``images_background.zip`` and ``images_evaluation.zip``;
            default ``$METAXFER_DATA/omniglot``.
        protocol: ``"vinyals"`` (1028/172/423 characters x 4 rotations) or
            ``"lake"`` (background alphabets = train, evaluation alphabets = test).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"`` (vinyals);
            ``"train"`` or ``"test"`` (lake).
        image_size: output side length (28 in MAML / ProtoNet papers).
        rotations: rotations in degrees (multiples of 90, counter-clockwise),
            each a separate class; default ``(0, 90, 180, 270)`` for vinyals and
            ``(0,)`` for lake.
        cache: True for the default cache folder (``$METAXFER_CACHE/omniglot`` or
            ``~/.cache/metaxfer/omniglot``), a folder path, or False for no disk cache.
        split_files: vinyals only: replaces the packaged character lists. A folder
            with ``train.txt`` / ``val.txt`` / ``test.txt``, or a dict mapping split
            names to a file path or a list of ``"ALPHABET/characterNN"`` names.

    Attributes:
        labels: ``int64 [N]`` class id per example.
        class_names: ``"ALPHABET/characterNN/rotDDD"`` per class, sorted by
            character then rotation (class id = index in this list).
        characters: the split's characters, sorted.
        preprocess: the :class:`ImagePreprocess` every image went through.

    Raises:
        DataError: missing root or zip, truncated/corrupted zip, unreadable PNG,
            or split-file characters absent from the zips (messages name the file).
        ConfigError: unknown protocol, split or rotations.

    Example:
        >>> train = Omniglot(split="train")           # 4112 classes x 20 images
        >>> x, y = train[0]                           # float32 [1, 28, 28], int
        >>> batch = train.gather(torch.tensor([0, 5]))  # float32 [2, 1, 28, 28]
    """

    name = "omniglot"

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        protocol: str = "vinyals",
        split: str = "train",
        image_size: int = 28,
        rotations: Sequence[int] | None = None,
        cache: bool | str | os.PathLike[str] = True,
        split_files: SplitFiles | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown Omniglot protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        if split not in SPLITS[protocol]:
            extra = " (lake: train = background alphabets, test = evaluation alphabets; use protocol='vinyals' for a val split)" if protocol == "lake" else ""
            raise ConfigError(f"unknown split {split!r} for protocol {protocol!r}; choose one of: {', '.join(SPLITS[protocol])}{extra}")
        if split_files is not None and protocol != "vinyals":
            raise ConfigError("split_files applies to protocol='vinyals' only; the lake protocol splits by zip")
        self.protocol = protocol
        self.split = split
        self.image_size = int(image_size)
        self.rotations = _normalise_rotations(rotations, protocol)
        self.preprocess = ImagePreprocess(size=self.image_size, mode="L", invert=True, resample="lanczos")
        self.root = resolve_data_root(root, "omniglot")
        cache_dir = cache_folder(cache, "omniglot")

        if protocol == "lake":
            zip_names: tuple[str, ...] = (BACKGROUND_ZIP,) if split == "train" else (EVALUATION_ZIP,)
        else:
            zip_names = ZIP_NAMES
        paths = [self.root / n for n in zip_names]
        for p in paths:  # fail on a missing zip before spending time decoding the other one
            if not p.is_file():
                raise _missing_zip_error(p)
        decoded = [load_zip(p, self.preprocess, cache_dir) for p in paths]
        self.zip_sha256 = {d.zip_name: d.sha256 for d in decoded}

        # Global (all loaded zips) tables: where each character's images start in `all_pixels`.
        start: dict[str, int] = {}
        count: dict[str, int] = {}
        offset = 0
        for d in decoded:
            for c, n in zip(d.characters, d.counts):
                if c in start:
                    raise DataError(f"character {c} appears in more than one zip under {self.root}; use the official zips")
                start[c], count[c] = offset, n
                offset += n
        all_pixels = decoded[0].pixels if len(decoded) == 1 else torch.cat([d.pixels for d in decoded])
        self._members: list[tuple[str, str]] = [(d.zip_name, m) for d in decoded for m in d.members]

        if protocol == "lake":
            characters = list(decoded[0].characters)
        else:
            characters, sources = _split_characters(split, split_files)
            missing = [c for c in characters if c not in start]
            if missing:
                shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
                raise DataError(
                    f"split file {' + '.join(sources)} lists characters that {' and '.join(zip_names)} under "
                    f"{self.root} do not contain: {shown}. The zips are incomplete or from another release: "
                    f"get the official zips (metaxfer.data.download_omniglot(root)), or pass split_files= with "
                    f"character lists that match your data."
                )
        if not characters:
            raise DataError(f"the {protocol} {split!r} split of {self.root} holds no characters; check split_files")
        self.characters = characters

        # Example order: by character, then rotation, then image (class id = char * R + rot).
        R = len(self.rotations)
        char_start = torch.tensor([start[c] for c in characters], dtype=torch.long)
        char_count = torch.tensor([count[c] for c in characters], dtype=torch.long)
        base_index = torch.cat([torch.arange(s, s + n) for s, n in zip(char_start.tolist(), char_count.tolist())])
        base = all_pixels[base_index]  # [M, 1, H, W], unrotated, grouped by character
        M = base.shape[0]
        base_start = torch.cumsum(char_count, 0) - char_count  # where each character starts in `base`
        class_count = char_count.repeat_interleave(R)  # [C * R]
        labels = torch.arange(len(class_count)).repeat_interleave(class_count)  # [M * R]
        class_start = torch.cumsum(class_count, 0) - class_count
        within = torch.arange(len(labels)) - class_start[labels]
        char_of, rot_of = labels // R, labels % R
        src = rot_of * M + base_start[char_of] + within  # index into the [R * M] stack below
        # torch.rot90 with dims (H, W) turns counter-clockwise for positive k.
        stacked = torch.cat([base if r == 0 else torch.rot90(base, r // 90, dims=(-2, -1)) for r in self.rotations])
        self._pixels = stacked[src].contiguous()  # uint8 [N, 1, H, W]
        self.labels = labels
        self._rotation_deg = torch.tensor(self.rotations, dtype=torch.int16)[rot_of]
        self._member_index = base_index[base_start[char_of] + within]
        self.class_names = [f"{c}/rot{r:03d}" for c in characters for r in self.rotations]

    # ------------------------------------------------------------ dataset protocol

    def source(self, index: int) -> dict[str, Any]:
        """Where example ``index`` comes from: zip name, member path and rotation in degrees."""
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} examples")
        zip_name, member = self._members[int(self._member_index[i])]
        return {"zip": zip_name, "member": member, "rotation": int(self._rotation_deg[i])}

    def describe(self) -> dict[str, Any]:
        """What identifies this data in a result record (JSON-friendly)."""
        digest = hashlib.sha256("\n".join(self.characters).encode()).hexdigest()[:16]
        return {
            "dataset": self.name,
            "protocol": self.protocol,
            "split": self.split,
            "image_size": self.image_size,
            "rotations": list(self.rotations),
            "characters": len(self.characters),
            "classes": self.num_classes,
            "examples": len(self),
            "characters_sha256": digest,
            "zips_sha256": dict(self.zip_sha256),
            "preprocess": self.preprocess.to_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"Omniglot(protocol={self.protocol!r}, split={self.split!r}, image_size={self.image_size}, "
            f"rotations={self.rotations}, classes={self.num_classes}, examples={len(self)}, root={str(self.root)!r})"
        )
