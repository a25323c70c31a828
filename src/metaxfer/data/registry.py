"""Dataset registry: ``create_dataset("omniglot", split="train", protocol="vinyals")``."""

from __future__ import annotations

from typing import Any

from metaxfer.data.omniglot import Omniglot
from metaxfer.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")
register_dataset = DATASETS.register


@register_dataset("omniglot")
def _omniglot(split: str = "train", **kwargs: Any) -> Omniglot:
    return Omniglot(split=split, **kwargs)


def create_dataset(name: str, split: str = "train", **kwargs: Any) -> Any:
    """Build a registered dataset by name.

    Args:
        name: registered name (see ``DATASETS.names()``).
        split: split name understood by that dataset.
        **kwargs: passed to the dataset (e.g. ``root``, ``protocol``, ``image_size``).

    Raises:
        ConfigError: for an unknown name, listing the registered ones.

    Example:
        >>> test = create_dataset("omniglot", split="test", protocol="vinyals", image_size=28)
    """
    return DATASETS.create(name, split=split, **kwargs)


def list_datasets() -> list[str]:
    """Names of all registered datasets."""
    return DATASETS.names()


@register_dataset("clusters")
def _clusters(split: str = "train", **kwargs: Any) -> Any:
    from metaxfer.data.synthetic import ClusterImages

    return ClusterImages(split=split, **kwargs)


@register_dataset("sinusoid")
def _sinusoid(split: str = "train", **kwargs: Any) -> Any:
    """Sinusoid regression tasks (Finn et al. 2017, section 5.1): a task distribution that samples its own
    episodes (``episode_sampler``), so :func:`metaxfer.build.build_sampler` uses it instead of an EpisodeSampler.
    ``kwargs``: ``amplitude``, ``phase``, ``x_range`` (each ``[low, high]``)."""
    from metaxfer.tasks.sinusoid import SinusoidTasks

    kwargs.pop("root", None)  # generated on the fly: no data folder
    return SinusoidTasks(split=split, **kwargs)


@register_dataset("image_folder")
def _image_folder(split: str = "train", root: Any = None, **kwargs: Any) -> Any:
    """A user's labelled folder ``root/CLASS_NAME/*.png`` (:class:`~metaxfer.data.image_folder.ImageFolder`).
    When ``root/<split>`` is a folder (``root/train/CLASS/...``, ``root/test/CLASS/...``) that is the split;
    otherwise ``root`` itself is used for every split."""
    from pathlib import Path

    from metaxfer.data.image_folder import ImageFolder
    from metaxfer.errors import DataError

    if root is None:
        raise DataError("the image_folder dataset needs root= (data.root: the folder with one sub-folder per class)")
    folder = Path(root).expanduser()
    if (folder / split).is_dir():
        folder = folder / split
    return ImageFolder(folder, split=split, **kwargs)


@register_dataset("fashion_mnist")
def _fashion_mnist(split: str = "train", **kwargs: Any) -> Any:
    """Fashion-MNIST from its IDX files (``root``, ``$METAXFER_DATA/fashion_mnist`` or the Debian package)."""
    from metaxfer.data.idx import FashionMNIST

    return FashionMNIST(split=split, **kwargs)


@register_dataset("mnist")
def _mnist(split: str = "train", **kwargs: Any) -> Any:
    """MNIST from its IDX files (``root`` or ``$METAXFER_DATA/mnist``)."""
    from metaxfer.data.idx import MNIST

    return MNIST(split=split, **kwargs)


@register_dataset("mini_imagenet")
def _mini_imagenet(split: str = "train", **kwargs: Any) -> Any:
    """miniImageNet, Ravi & Larochelle split (64 / 16 / 20 classes): ``root`` or ``$METAXFER_DATA/mini_imagenet``
    with ``train.csv``, ``val.csv``, ``test.csv`` and ``images/``
    (:class:`~metaxfer.data.mini_imagenet.MiniImageNet`)."""
    from metaxfer.data.mini_imagenet import MiniImageNet

    return MiniImageNet(split=split, **kwargs)


@register_dataset("tiered_imagenet")
def _tiered_imagenet(split: str = "train", **kwargs: Any) -> Any:
    """tieredImageNet (351 / 97 / 160 classes): the ``<split>_images_png.pkl`` + ``<split>_labels.pkl`` release
    or ``<split>/CLASS/*.jpg`` folders (:class:`~metaxfer.data.tiered_imagenet.TieredImageNet`)."""
    from metaxfer.data.tiered_imagenet import TieredImageNet

    return TieredImageNet(split=split, **kwargs)


@register_dataset("cifar_fs")
def _cifar_fs(split: str = "train", **kwargs: Any) -> Any:
    """CIFAR-FS (64 / 16 / 20 classes) from ``cifar-100-python/`` in ``root`` or ``$METAXFER_DATA/cifar100``
    (:class:`~metaxfer.data.cifar.CIFARFS`)."""
    from metaxfer.data.cifar import CIFARFS

    return CIFARFS(split=split, **kwargs)


@register_dataset("fc100")
def _fc100(split: str = "train", **kwargs: Any) -> Any:
    """FC100 (superclass split, 60 / 20 / 20 classes) from ``cifar-100-python/`` in ``root`` or
    ``$METAXFER_DATA/cifar100`` (:class:`~metaxfer.data.cifar.FC100`)."""
    from metaxfer.data.cifar import FC100

    return FC100(split=split, **kwargs)


@register_dataset("cub")
def _cub(split: str = "train", **kwargs: Any) -> Any:
    """CUB-200-2011 with the Chen et al. 2019 split (100 / 50 / 50 classes) from ``CUB_200_2011/`` in ``root``
    or ``$METAXFER_DATA/cub`` (:class:`~metaxfer.data.cub.CUB`)."""
    from metaxfer.data.cub import CUB

    return CUB(split=split, **kwargs)
