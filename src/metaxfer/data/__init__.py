"""Datasets, their registry and image preprocessing.

Example:
    >>> from metaxfer.data import Omniglot
    >>> train = Omniglot(root="/data/omniglot", protocol="vinyals", split="train")  # 4112 classes
"""

from metaxfer.data.download import download_omniglot
from metaxfer.data.images import ImagePreprocess
from metaxfer.data.omniglot import Omniglot
from metaxfer.data.paths import resolve_cache_dir, resolve_data_root
from metaxfer.data.registry import DATASETS, create_dataset, list_datasets

__all__ = [
    "DATASETS",
    "ImagePreprocess",
    "Omniglot",
    "create_dataset",
    "download_omniglot",
    "list_datasets",
    "resolve_cache_dir",
    "resolve_data_root",
]
