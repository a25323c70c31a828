"""Download the official Omniglot zips, verified, written atomically.

The official files are ``python/images_background.zip`` and
``python/images_evaluation.zip`` of github.com/brendenlake/omniglot. Their MD5s
(and sizes) are known from public checksum lists and are always verified.
Their sha256s were not known when this module was written (no network), so
:data:`OMNIGLOT_SHA256` is empty; pass ``sha256=`` to verify one you trust.

Note: a re-zipped copy (e.g. the offline copy in ``../shared/data/omniglot``
used during development) holds the same PNGs but *different zip bytes*, so it
does not match these checksums. That is expected: :func:`download_omniglot`
only checks what it downloads and leaves files already present untouched.
For reference, that copy's sha256s are 40aeb46d4dc1eaf84e5613fa36f9b0d2348478fd6c61356c813608234e38d88a
(images_background.zip, 8,588,032 bytes) and
6e680d4cdf97e47032881da4cd1e338e22e9029d14809fe37c93eeba963ed2a8
(images_evaluation.zip, 5,863,926 bytes); :meth:`metaxfer.data.Omniglot.describe`
records the sha256 of whichever zips were used.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from metaxfer.errors import DataError

OMNIGLOT_URLS: dict[str, str] = {
    "images_background.zip": "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
    "images_evaluation.zip": "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
}
#: MD5 of the official files (datasets-mila/datasets--omniglot md5sums; same as torchvision's).
OMNIGLOT_MD5: dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
#: Byte sizes of the official files.
OMNIGLOT_SIZES: dict[str, int] = {
    "images_background.zip": 9464212,
    "images_evaluation.zip": 6462886,
}
#: sha256 of the official files; unknown offline, filled in when verified. None = not checked.
OMNIGLOT_SHA256: dict[str, str | None] = {
    "images_background.zip": None,
    "images_evaluation.zip": None,
}


def _fetch(url: str, part: Path, timeout: float) -> tuple[str, str, int]:
    """Stream ``url`` into ``part``; returns (md5, sha256, size) of the bytes written."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                md5.update(block)
                sha.update(block)
                size += len(block)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download {url} to {part.with_suffix('')} ({type(e).__name__}: {e}). "
            f"Check the network, or download the file by hand and put it in {part.parent}."
        ) from e
    return md5.hexdigest(), sha.hexdigest(), size


def download_omniglot(
    root: str | os.PathLike[str],
    *,
    sha256: Mapping[str, str] | None = None,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download ``images_background.zip`` and ``images_evaluation.zip`` into ``root``.

    Each file is streamed to ``<name>.part``, its MD5 (and sha256, when known)
    checked, and only then renamed into place with :func:`os.replace`, so
    ``root`` never holds a partial or unverified zip under the real name.

    Args:
        root: destination folder (created if needed). Use it as
            ``Omniglot(root=root)``, or put it at ``$METAXFER_DATA/omniglot``.
        sha256: optional expected sha256 per file name, checked in addition to
            the MD5 (and to :data:`OMNIGLOT_SHA256`).
        force: download even when the file already exists.
        timeout: socket timeout in seconds.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        DataError: on a network error or a checksum mismatch (the ``.part``
            file is deleted; nothing is written under the real name).
    """
    folder = Path(root).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    expected_sha = dict(OMNIGLOT_SHA256)
    expected_sha.update(dict(sha256 or {}))
    for name, url in OMNIGLOT_URLS.items():
        dest = folder / name
        if dest.exists() and not force:
            # Existing files are trusted as they are: re-zipped copies are valid data with other checksums.
            continue
        fetch_verified(
            url, dest, md5=OMNIGLOT_MD5[name], sha256=expected_sha.get(name), size=OMNIGLOT_SIZES[name], timeout=timeout
        )
    return folder


def fetch_verified(
    url: str, dest: Path, *, md5: str, sha256: str | None = None, size: int | None = None, timeout: float = 60.0
) -> None:
    """Download ``url`` to ``dest`` (its folder must exist): streamed to ``<dest>.part``, its MD5 (and
    ``sha256``, when given) checked, then renamed into place. ``size``, when given, is quoted on a mismatch.

    Raises:
        DataError: on a network error or a checksum mismatch (the ``.part``
            file is deleted; nothing is written under ``dest``).
    """
    part = dest.with_name(dest.name + ".part")
    try:
        got_md5, got_sha, got_size = _fetch(url, part, timeout)
        problems = []
        if got_md5 != md5:
            expected_size = "" if size is None else f" (expected {size})"
            problems.append(f"md5 {got_md5} (expected {md5}), {got_size} bytes{expected_size}")
        if sha256 and got_sha != sha256.lower():
            problems.append(f"sha256 {got_sha} (expected {sha256.lower()})")
        if problems:
            raise DataError(
                f"checksum mismatch for {url}: got {'; '.join(problems)}. The download is incomplete or the file "
                f"changed upstream; nothing was written to {dest}. Try again, or download it by hand and put it in "
                f"{dest.parent}."
            )
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
