"""IDX readers (MNIST / Fashion-MNIST) on tiny generated files: gzip or raw, truncation, default roots."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaxfer.data import create_dataset
from metaxfer.data import idx as idx_module
from metaxfer.data.idx import IDXImages, read_idx
from metaxfer.errors import ConfigError, DataError
from metaxfer.tasks.sampler import EpisodeSampler


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}[array.dtype]
    return struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_split(root: Path, prefix: str, n: int, gz: bool, seed: int = 0, side: int = 28) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzip_and_raw(tmp_path, gz):
    images, labels = write_split(tmp_path, "train", 30, gz)
    write_split(tmp_path, "t10k", 20, gz, seed=1)
    data = IDXImages(root=tmp_path, split="train")
    assert data.pixels.shape == (30, 1, 28, 28) and torch.equal(data.pixels[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.long
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    x, y = data[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    torch.testing.assert_close(x[0], torch.from_numpy(images[3]).float() / 255)  # white on black kept: no inversion
    assert len(IDXImages(root=tmp_path, split="test")) == 20
    episode = EpisodeSampler(data, ways=5, shots=1, queries=1, seed=0).sample_batch(2)
    assert episode.support_x.shape == (2, 5, 1, 28, 28)


def test_registry_names_and_resize(tmp_path):
    images, _ = write_split(tmp_path / "fm", "t10k", 12, True)
    data = create_dataset("fashion_mnist", split="test", root=tmp_path / "fm", image_size=14)
    assert data.pixels.shape == (12, 1, 14, 14)
    # The same tensors as preprocessing a user's 28x28 PNG with the dataset's own preprocess.
    torch.testing.assert_close(data.gather(torch.tensor([5]))[0], data.preprocess([Image.fromarray(images[5])])[0])
    mnist = create_dataset("mnist", split="test", root=tmp_path / "fm")
    assert mnist.class_names == [str(d) for d in range(10)] and mnist.describe()["dataset"] == "mnist"


def test_read_idx_dtypes(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    (tmp_path / "x").write_bytes(idx_bytes(arr))
    out = read_idx(tmp_path / "x")
    assert out.tolist() == arr.tolist() and out.dtype.isnative
    f = np.array([1.5, -2.0], dtype=">f4")
    (tmp_path / "f").write_bytes(gzip.compress(idx_bytes(f)))
    assert read_idx(tmp_path / "f").tolist() == [1.5, -2.0]


def test_truncated_file_named(tmp_path):
    write_split(tmp_path, "train", 10, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated: shape \(10, 28, 28\) needs 7856 bytes"):
        IDXImages(root=tmp_path, split="train")
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated: its header is cut off"):
        read_idx(path)


def test_truncated_gzip_named(tmp_path):
    write_split(tmp_path, "train", 10, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz is not a readable gzip file, it is truncated"):
        IDXImages(root=tmp_path, split="train")


def test_bad_magic_and_mismatched_pair(tmp_path):
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="junk is not an IDX file"):
        read_idx(tmp_path / "junk")
    write_split(tmp_path, "train", 10, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, dtype=np.uint8)))
    with pytest.raises(DataError, match="holds \\(9,\\) labels for 10 images"):
        IDXImages(root=tmp_path, split="train")


def test_missing_files_and_bad_split(tmp_path):
    with pytest.raises(DataError, match=r"has no train-images-idx3-ubyte.gz or train-images-idx3-ubyte"):
        IDXImages(root=tmp_path, split="train")
    with pytest.raises(ConfigError, match="unknown split 'val'"):
        IDXImages(root=tmp_path, split="val")


def test_default_root_env_then_debian(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    write_split(debian, "t10k", 5, gz=True)
    monkeypatch.setitem(idx_module.DEBIAN_ROOTS, "fashion_mnist", debian)
    monkeypatch.setenv("METAXFER_DATA", str(tmp_path / "env"))
    assert IDXImages(split="test").root == debian  # $METAXFER_DATA/fashion_mnist does not exist
    write_split(tmp_path / "env" / "fashion_mnist", "t10k", 7, gz=False)
    assert len(IDXImages(split="test")) == 7  # it exists now and wins
    monkeypatch.delenv("METAXFER_DATA")
    monkeypatch.setitem(idx_module.DEBIAN_ROOTS, "fashion_mnist", tmp_path / "none")
    with pytest.raises(DataError, match=r"no fashion_mnist data found .*apt-get install dataset-fashion-mnist"):
        IDXImages(split="test")
