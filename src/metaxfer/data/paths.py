"""Where datasets and their decoded caches live.

Data roots come from an explicit ``root=`` argument or the ``METAXFER_DATA``
environment variable (``$METAXFER_DATA/<dataset>``); nothing is guessed, so a
run never silently reads a different copy of the data than the one intended.
Decoded-image caches go to ``$METAXFER_CACHE/<dataset>`` or, when that is unset,
``$XDG_CACHE_HOME/metaxfer/<dataset>`` (default ``~/.cache/metaxfer/<dataset>``).
"""

from __future__ import annotations

import os
from pathlib import Path

from metaxfer.errors import DataError

DATA_ENV = "METAXFER_DATA"
CACHE_ENV = "METAXFER_CACHE"


def resolve_data_root(root: str | os.PathLike[str] | None = None, dataset: str = "omniglot") -> Path:
    """The folder that holds ``dataset``'s files.

    Args:
        root: an explicit folder; wins over the environment.
        dataset: sub-folder of ``$METAXFER_DATA`` used when ``root`` is None.

    Returns:
        ``root`` (user-expanded) or ``$METAXFER_DATA/<dataset>``. Existence is
        not checked here: the dataset checks for its own files and names them.

    Raises:
        DataError: when ``root`` is None and ``METAXFER_DATA`` is unset or empty.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return Path(env).expanduser() / dataset
    hint = ""
    if dataset == "omniglot":
        hint = " To fetch the official files, call metaxfer.data.download_omniglot(root)."
    raise DataError(
        f"no data root for {dataset!r}: pass root= (the folder holding the {dataset} files) "
        f"or set {DATA_ENV} so that the files are under ${DATA_ENV}/{dataset}/.{hint}"
    )


def resolve_cache_dir(dataset: str = "omniglot") -> Path:
    """The folder for ``dataset``'s decoded-image caches (not created here).

    ``$METAXFER_CACHE/<dataset>`` when ``METAXFER_CACHE`` is set, else
    ``$XDG_CACHE_HOME/metaxfer/<dataset>`` with ``XDG_CACHE_HOME`` defaulting
    to ``~/.cache``.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser() / dataset
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "metaxfer" / dataset


def cache_folder(cache: bool | str | os.PathLike[str] | None, dataset: str) -> Path | None:
    """A dataset's ``cache=`` argument: True -> :func:`resolve_cache_dir`, False/None -> no cache, else the path."""
    if cache is True:
        return resolve_cache_dir(dataset)
    if cache is False or cache is None:
        return None
    return Path(cache).expanduser()
