"""miniImageNet, tieredImageNet, CIFAR-FS, FC100 and CUB on tiny generated files in the real formats.

No downloads: every file is written into tmp_path (JPEGs/PNGs of random noise,
fake CIFAR-100 pickles with the real class names, tieredImageNet pickles).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaxfer.data import cifar as cifar_module
from metaxfer.data import create_dataset
from metaxfer.data import fewshot_io as fewshot_io_module
from metaxfer.data import tiered_imagenet as tiered_module
from metaxfer.data.cifar import (
    CIFAR100_SUPERCLASSES,
    CIFARFS,
    FC100,
    download_cifar100,
    split_classes,
)
from metaxfer.data.cub import CUB, in_split
from metaxfer.data.fewshot_io import extract_archive, load_data_pickle, read_name_list
from metaxfer.data.mini_imagenet import MiniImageNet
from metaxfer.data.tiered_imagenet import TieredImageNet
from metaxfer.errors import ConfigError, DataError
from metaxfer.tasks import EpisodeSampler

ALL_CIFAR100 = sorted(c for cs in CIFAR100_SUPERCLASSES.values() for c in cs)
SUPERCLASS_NAMES = sorted(CIFAR100_SUPERCLASSES)
SUPERCLASS_OF = {c: s for s, cs in CIFAR100_SUPERCLASSES.items() for c in cs}


def noise_image(
    rng: np.random.Generator, size: tuple[int, int] = (24, 20)
) -> Image.Image:
    w, h = size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the slow path (image decoding) of every benchmark loader; returns the image counts decoded."""
    calls: list[int] = []
    real = fewshot_io_module.decode_images

    def counting(count, *args, **kwargs):
        calls.append(count)
        return real(count, *args, **kwargs)

    for module in (fewshot_io_module, tiered_module, cifar_module):
        monkeypatch.setattr(module, "decode_images", counting)
    return calls


def check_episode(
    data, ways: int, shots: int = 1, queries: int = 2, size: int = 16
) -> None:
    episode = EpisodeSampler(
        data, ways=ways, shots=shots, queries=queries, seed=0
    ).sample_batch(1)
    assert episode.support_x.shape == (1, ways * shots, 3, size, size)
    assert episode.query_x.shape == (1, ways * queries, 3, size, size)
    assert episode.support_x.dtype == torch.float32


# ------------------------------------------------------------------ miniImageNet

MINI = {
    "train": ["n01", "n02", "n03", "n04"],
    "val": ["n05", "n06"],
    "test": ["n07", "n08", "n09"],
}
MINI_PER_CLASS = 4


def make_mini(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for split, classes in MINI.items():
        rows = ["filename,label"]
        for c in classes:
            for i in range(MINI_PER_CLASS):
                name = f"{c}{i:08d}.jpg"
                noise_image(rng, (30, 26)).save(root / "images" / name, quality=90)
                rows.append(f"{name},{c}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    return make_mini(tmp_path / "mini_imagenet")


def test_mini_imagenet_loads_each_split(mini_root: Path) -> None:
    splits = {
        s: MiniImageNet(mini_root, split=s, image_size=16)
        for s in ("train", "val", "test")
    }
    for s, data in splits.items():
        assert data.class_names == MINI[s] and data.num_classes == len(MINI[s])
        assert data.labels.dtype == torch.int64
        assert torch.equal(
            torch.bincount(data.labels), torch.full((len(MINI[s]),), MINI_PER_CLASS)
        )
        assert data.pixels.shape == (len(MINI[s]) * MINI_PER_CLASS, 3, 16, 16)
        x, y = data[0]
        assert (
            x.shape == (3, 16, 16)
            and y == 0
            and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
        )
        assert data.describe()["layout"] == "csv" and data.describe()["classes"] == len(
            MINI[s]
        )
    names = [set(d.class_names) for d in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    # The dataset's tensor equals preprocessing the file directly, as a trained learner would.
    train = splits["train"]
    torch.testing.assert_close(
        train.gather(torch.tensor([5]))[0],
        train.preprocess([Image.open(train.files[5])])[0],
    )
    check_episode(train, ways=3)
    trainval = MiniImageNet(mini_root, split="trainval", image_size=16)
    assert trainval.class_names == sorted(MINI["train"] + MINI["val"])


def test_mini_imagenet_registry_and_env_root(
    mini_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (mini_root / "images" / "n05").mkdir()  # images/<label>/<filename> is accepted too
    (mini_root / "images" / "n0500000001.jpg").rename(
        mini_root / "images" / "n05" / "n0500000001.jpg"
    )
    data = create_dataset("mini_imagenet", split="val", root=mini_root, image_size=16)
    assert (
        isinstance(data, MiniImageNet)
        and data.num_classes == 2
        and len(data) == 2 * MINI_PER_CLASS
    )
    monkeypatch.setenv("METAXFER_DATA", str(mini_root.parent))
    assert MiniImageNet(split="test", image_size=16).num_classes == 3


def test_mini_imagenet_decodes_once_then_uses_the_cache(
    mini_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_decodes(monkeypatch)
    first = MiniImageNet(mini_root, split="train", image_size=16)
    second = MiniImageNet(mini_root, split="train", image_size=16)
    assert calls == [16] and torch.equal(first.pixels, second.pixels)
    MiniImageNet(
        mini_root, split="train", image_size=12
    )  # other settings: another cache entry
    assert len(calls) == 2
    image = mini_root / "images" / "n0100000000.jpg"
    Image.new("RGB", (30, 26), (200, 10, 10)).save(
        image
    )  # a changed file changes the key
    os.utime(image, ns=(1, 1))
    changed = MiniImageNet(mini_root, split="train", image_size=16)
    assert len(calls) == 3 and not torch.equal(changed.pixels[0], first.pixels[0])
    MiniImageNet(mini_root, split="train", image_size=16, cache=False)
    assert len(calls) == 4


def test_mini_imagenet_folder_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split, classes in MINI.items():
        for c in classes:
            (tmp_path / "m" / split / c).mkdir(parents=True)
            for i in range(3):
                noise_image(rng).save(tmp_path / "m" / split / c / f"{i}.jpg")
    data = MiniImageNet(tmp_path / "m", split="test", image_size=16)
    assert (
        data.layout == "folders" and data.class_names == MINI["test"] and len(data) == 9
    )


def test_mini_imagenet_errors(mini_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        MiniImageNet(tmp_path / "nowhere")
    with pytest.raises(DataError, match="METAXFER_DATA"):
        MiniImageNet()
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        MiniImageNet(mini_root, split="valid")

    (mini_root / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test\.csv not found"):
        MiniImageNet(mini_root, split="test")
    with pytest.raises(DataError, match=r"did you mean root="):
        MiniImageNet(mini_root.parent, split="train")

    (mini_root / "images" / "n0500000002.jpg").unlink()
    with pytest.raises(
        DataError, match=r"val\.csv:4 names n0500000002\.jpg \(class n05\)"
    ) as e:
        MiniImageNet(mini_root, split="val")
    assert "images" in str(e.value)

    with open(mini_root / "train.csv", "a") as f:
        f.write("just_one_column\n")
    with pytest.raises(DataError, match=r"train\.csv:18: expected 'filename,label'"):
        MiniImageNet(mini_root, split="train")


def test_mini_imagenet_missing_images_folder_and_corrupted_image(
    tmp_path: Path,
) -> None:
    root = make_mini(tmp_path / "a")
    (root / "images" / "n0700000001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"n0700000001\.jpg is not a readable image"):
        MiniImageNet(root, split="test", image_size=16)
    (root / "images").rename(root / "pictures")
    with pytest.raises(DataError, match=r"image folder .*images does not exist"):
        MiniImageNet(root, split="train")


# ------------------------------------------------------------------ tieredImageNet

TIERED = {  # split -> (category -> classes)
    "train": {"animal": ["dog", "cat", "cow"], "tool": ["saw"]},
    "val": {"plant": ["oak", "fern"]},
    "test": {"food": ["bread", "soup"], "vehicle": ["car"]},
}
TIERED_PER_CLASS = 3


def make_tiered_pickles(root: Path, seed: int = 0, bytes_keys: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, cats in TIERED.items():
        classes = [c for cs in cats.values() for c in cs]
        general_names = list(cats)
        images, specific, general = [], [], []
        for g, (cat, cs) in enumerate(cats.items()):
            for c in cs:
                for _ in range(TIERED_PER_CLASS):
                    images.append(
                        np.frombuffer(
                            png_bytes(noise_image(rng, (84, 84))), dtype=np.uint8
                        )
                    )
                    specific.append(classes.index(c))
                    general.append(g)
        labels = {
            "label_specific": np.array(specific, dtype=np.int32),
            "label_general": np.array(general, dtype=np.int32),
            "label_specific_str": classes,
            "label_general_str": general_names,
        }
        if bytes_keys:
            labels = {k.encode(): v for k, v in labels.items()}
        with open(root / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(images, f, protocol=2)
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(labels, f, protocol=2)
    return root


@pytest.fixture
def tiered_root(tmp_path: Path) -> Path:
    return make_tiered_pickles(tmp_path / "tiered_imagenet")


def test_tiered_imagenet_pickles(tiered_root: Path) -> None:
    splits = {
        s: TieredImageNet(tiered_root, split=s, image_size=16)
        for s in ("train", "val", "test")
    }
    for s, data in splits.items():
        classes = [c for cs in TIERED[s].values() for c in cs]
        assert data.format == "pickle" and data.class_names == classes
        assert torch.equal(
            torch.bincount(data.labels), torch.full((len(classes),), TIERED_PER_CLASS)
        )
        assert data.pixels.shape == (len(classes) * TIERED_PER_CLASS, 3, 16, 16)
        assert data.class_categories == [
            cat for cat, cs in TIERED[s].items() for _ in cs
        ]
    all_names = [n for d in splits.values() for n in d.class_names]
    assert len(all_names) == len(set(all_names))  # class-disjoint
    check_episode(splits["train"], ways=4)
    trainval = create_dataset(
        "tiered_imagenet", split="trainval", root=tiered_root, image_size=16
    )
    assert trainval.class_names == ["dog", "cat", "cow", "saw", "oak", "fern"]
    assert trainval.labels[-1] == 5 and len(trainval) == 6 * TIERED_PER_CLASS
    # At 84x84 the PNG pixels are kept exactly (true RGB, decoded by Pillow).
    full = TieredImageNet(tiered_root, split="val", cache=False)
    with open(tiered_root / "val_images_png.pkl", "rb") as f:
        first = Image.open(io.BytesIO(pickle.load(f)[0].tobytes()))
    assert torch.equal(
        full.pixels[0], torch.from_numpy(np.array(first)).permute(2, 0, 1)
    )


def test_tiered_imagenet_bytes_keys_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_tiered_pickles(tmp_path / "t", bytes_keys=True)
    calls = count_decodes(monkeypatch)
    a = TieredImageNet(root, split="test", image_size=16)
    b = TieredImageNet(root, split="test", image_size=16)
    assert (
        calls == [9]
        and torch.equal(a.pixels, b.pixels)
        and a.class_names == ["bread", "soup", "car"]
    )


def test_tiered_imagenet_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for split, cats in TIERED.items():
        for c in (c for cs in cats.values() for c in cs):
            (tmp_path / "t" / split / c).mkdir(parents=True)
            for i in range(TIERED_PER_CLASS):
                noise_image(rng).save(tmp_path / "t" / split / c / f"{i}.png")
    data = TieredImageNet(tmp_path / "t", split="train", image_size=16)
    assert data.format == "folders" and data.class_names == ["cat", "cow", "dog", "saw"]
    assert data.class_categories is None
    check_episode(data, ways=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="format='pickle'"):
        TieredImageNet(tmp_path / "empty", split="train", format="folders")


def test_tiered_imagenet_errors(tiered_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tieredImageNet format"):
        TieredImageNet(tiered_root, format="npz")
    with pytest.raises(ConfigError, match="unknown split"):
        TieredImageNet(tiered_root, split="novel")

    (tiered_root / "test_labels.pkl").unlink()
    with pytest.raises(DataError, match=r"test_labels\.pkl not found"):
        TieredImageNet(tiered_root, split="test")
    (tiered_root / "test_images_png.pkl").unlink()
    with pytest.raises(
        DataError, match=r"neither test_images_png\.pkl \+ test_labels\.pkl"
    ):
        TieredImageNet(tiered_root, split="test")

    labels = tiered_root / "val_labels.pkl"
    labels.write_bytes(labels.read_bytes()[:50])
    with pytest.raises(
        DataError, match=r"val_labels\.pkl is not a readable data pickle"
    ):
        TieredImageNet(tiered_root, split="val")


def test_tiered_imagenet_corrupted_png_and_mismatched_files(tmp_path: Path) -> None:
    root = make_tiered_pickles(tmp_path / "t")
    with open(root / "train_images_png.pkl", "rb") as f:
        images = pickle.load(f)
    images[2] = np.frombuffer(b"\x89PNG broken", dtype=np.uint8)
    with open(root / "train_images_png.pkl", "wb") as f:
        pickle.dump(images, f)
    with pytest.raises(
        DataError, match=r"train_images_png\.pkl: image 2 is not a readable PNG"
    ):
        TieredImageNet(root, split="train", image_size=16)
    with open(root / "train_images_png.pkl", "wb") as f:
        pickle.dump(images[:5], f)
    with pytest.raises(DataError, match="holds 5 images but the labels file lists 12"):
        TieredImageNet(root, split="train", image_size=16)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_data_pickles_cannot_run_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"data": _Exploit()}))
    with pytest.raises(
        DataError, match=r"evil\.pkl .*global (posix|os|nt)\.system is not allowed"
    ):
        load_data_pickle(path, "get a fresh copy")
    arrays = {"a": np.arange(3, dtype=np.int64), "b": [np.int32(4)], "c": b"raw"}
    path.write_bytes(pickle.dumps(arrays, protocol=2))
    loaded = load_data_pickle(path, "")
    assert (
        loaded["a"].tolist() == [0, 1, 2]
        and int(loaded["b"][0]) == 4
        and loaded["c"] == b"raw"
    )


# ------------------------------------------------------------------ CIFAR-FS and FC100

CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 3, 1


def make_cifar100(root: Path, seed: int = 0) -> Path:
    """Fake ``cifar-100-python/{meta,train,test}`` with the real class names and label ids."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    meta = {"fine_label_names": ALL_CIFAR100, "coarse_label_names": SUPERCLASS_NAMES}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    for part, per_class in (
        ("train", CIFAR_TRAIN_PER_CLASS),
        ("test", CIFAR_TEST_PER_CLASS),
    ):
        fine = [i for i in range(100) for _ in range(per_class)]
        order = rng.permutation(len(fine))  # the real files are not grouped by class
        fine = [fine[i] for i in order]
        entry = {
            "filenames": [f"img_{i}.png" for i in range(len(fine))],
            "batch_label": f"{part} batch",
            "fine_labels": fine,
            "coarse_labels": [
                SUPERCLASS_NAMES.index(SUPERCLASS_OF[ALL_CIFAR100[i]]) for i in fine
            ],
            "data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
        }
        with open(folder / part, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar100(tmp_path_factory.mktemp("cifar") / "cifar100")


def test_cifar_fs_splits(cifar_root: Path) -> None:
    per_class = CIFAR_TRAIN_PER_CLASS + CIFAR_TEST_PER_CLASS
    splits = {s: CIFARFS(cifar_root, split=s) for s in ("train", "val", "test")}
    for s, n in {"train": 64, "val": 16, "test": 20}.items():
        data = splits[s]
        assert data.num_classes == n and len(data) == n * per_class
        assert torch.equal(torch.bincount(data.labels), torch.full((n,), per_class))
        assert data.class_names == sorted(split_classes("cifar_fs", s))
        assert data.pixels.shape == (n * per_class, 3, 32, 32)
    assert (
        "whale" in splits["test"].class_names
        and "dolphin" in splits["train"].class_names
    )
    names = [set(d.class_names) for d in splits.values()]
    assert set.union(*names) == set(ALL_CIFAR100) and sum(map(len, names)) == 100
    check_episode(splits["val"], ways=5, shots=1, queries=3, size=32)
    # Pixels are the stored ones: the first 'whale' example is the first whale image of the train pickle.
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f)
    whale = ALL_CIFAR100.index("whale")
    first = raw["data"][raw["fine_labels"].index(whale)].reshape(3, 32, 32)
    test = splits["test"]
    at = int((test.labels == test.class_names.index("whale")).nonzero()[0])
    assert torch.equal(test.pixels[at], torch.from_numpy(first))
    assert (
        create_dataset("cifar_fs", split="trainval", root=cifar_root).num_classes == 80
    )


def test_fc100_splits_by_superclass(
    cifar_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "METAXFER_DATA", str(cifar_root.parent)
    )  # $METAXFER_DATA/cifar100
    expected = {
        "train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19],
        "val": [8, 11, 13, 16],
        "test": [0, 7, 12, 14],
    }
    seen: set[str] = set()
    for s, ids in expected.items():
        data = create_dataset("fc100", split=s)
        assert isinstance(data, FC100) and data.num_classes == 5 * len(ids)
        assert sorted(set(data.superclasses)) == [SUPERCLASS_NAMES[i] for i in ids]
        assert all(
            SUPERCLASS_OF[c] == g for c, g in zip(data.class_names, data.superclasses)
        )
        assert not seen & set(data.class_names)
        seen |= set(data.class_names)
    assert seen == set(ALL_CIFAR100)


def test_cifar_resize_and_root_variants(cifar_root: Path) -> None:
    small = CIFARFS(cifar_root / "cifar-100-python", split="test", image_size=16)
    assert small.pixels.shape == (80, 3, 16, 16)
    check_episode(small, ways=5)
    x = Image.fromarray(
        CIFARFS(cifar_root, split="test").pixels[0].permute(1, 2, 0).numpy()
    )
    torch.testing.assert_close(
        small.gather(torch.tensor([0]))[0], small.preprocess([x])[0]
    )


def test_committed_cifar_split_lists() -> None:
    for protocol, sizes in {"cifar_fs": (64, 16, 20), "fc100": (60, 20, 20)}.items():
        lists = {s: split_classes(protocol, s) for s in ("train", "val", "test")}
        assert tuple(len(v) for v in lists.values()) == sizes
        assert all(len(set(v)) == len(v) for v in lists.values())
        union = set(lists["train"]) | set(lists["val"]) | set(lists["test"])
        assert len(union) == 100 and union == set(ALL_CIFAR100)
    # FC100: every split is a union of whole superclasses, 12 / 4 / 4 of them.
    for s, n in {"train": 12, "val": 4, "test": 4}.items():
        classes = set(split_classes("fc100", s))
        supers = {SUPERCLASS_OF[c] for c in classes}
        assert len(supers) == n and classes == {
            c for g in supers for c in CIFAR100_SUPERCLASSES[g]
        }
    assert split_classes("cifar_fs", "trainval") == sorted(
        split_classes("cifar_fs", "train") + split_classes("cifar_fs", "val")
    )


def test_cifar_errors(cifar_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown split"):
        CIFARFS(cifar_root, split="novel")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"has no meta, train, test.*download_cifar100"):
        FC100(empty)
    (empty / "cifar-100-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"extract it with `tar xzf"):
        FC100(empty)
    with pytest.raises(DataError, match=r"cifar100"):
        CIFARFS()  # no root, no METAXFER_DATA

    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "train.txt").write_text("apple\nunicorn\n")
    with pytest.raises(
        DataError, match=r"names classes that .*meta does not have: unicorn"
    ):
        CIFARFS(cifar_root, split="train", split_dir=split_dir)
    (split_dir / "val.txt").write_text("# a comment\napple\n\nbear\n")
    assert CIFARFS(cifar_root, split="val", split_dir=split_dir).class_names == [
        "apple",
        "bear",
    ]

    broken = make_cifar100(tmp_path / "broken")
    train = broken / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:1000])
    with pytest.raises(
        DataError, match=r"cifar-100-python/train is not a readable data pickle"
    ):
        CIFARFS(broken, split="test")


def test_download_cifar100_checksum_mismatch_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metaxfer.data import download as download_module

    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0):
        urls.append(url)
        return io.BytesIO(b"<html>moved</html>")

    monkeypatch.setattr(download_module.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DataError, match="checksum mismatch"):
        download_cifar100(tmp_path / "c")
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    assert list((tmp_path / "c").iterdir()) == []


def test_extract_archive_refuses_paths_outside_the_folder(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="evil.tar.gz"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------ CUB-200-2011

CUB_CLASSES = [
    f"{i:03d}.Bird_{chr(64 + i)}" for i in range(1, 9)
]  # 8 classes: 4 train, 2 val, 2 test
CUB_PER_CLASS = 3


def make_cub(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "CUB_200_2011"
    for c in CUB_CLASSES:
        (folder / "images" / c).mkdir(parents=True)
        for i in range(CUB_PER_CLASS):
            noise_image(rng, (40, 30)).save(
                folder / "images" / c / f"{c.split('.')[1]}_{i:04d}.jpg"
            )
    (folder / "classes.txt").write_text(
        "".join(f"{i} {c}\n" for i, c in enumerate(CUB_CLASSES, start=1))
    )
    return root


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    return make_cub(tmp_path / "cub")


def test_cub_split_of_chen_et_al(cub_root: Path) -> None:
    expected = {"train": [0, 2, 4, 6], "val": [1, 5], "test": [3, 7]}
    loaded = {}
    for s, idx in expected.items():
        data = CUB(cub_root, split=s, image_size=16)
        assert data.class_names == [CUB_CLASSES[i] for i in idx]
        assert torch.equal(
            torch.bincount(data.labels), torch.full((len(idx),), CUB_PER_CLASS)
        )
        assert data.pixels.shape == (len(idx) * CUB_PER_CLASS, 3, 16, 16)
        loaded[s] = set(data.class_names)
    assert not (
        loaded["train"] & loaded["val"]
        or loaded["train"] & loaded["test"]
        or loaded["val"] & loaded["test"]
    )
    check_episode(CUB(cub_root, split="train", image_size=16), ways=4)
    # On the full data: 100 / 50 / 50 classes.
    assert [
        sum(in_split(i, s) for i in range(200)) for s in ("train", "val", "test")
    ] == [100, 50, 50]
    data = create_dataset(
        "cub", split="test", root=cub_root / "CUB_200_2011", image_size=16
    )
    assert isinstance(data, CUB) and data.num_classes == 2


def test_cub_errors(cub_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown split"):
        CUB(cub_root, split="base")
    with pytest.raises(DataError, match="CUB images not found"):
        CUB(tmp_path)
    folder = cub_root / "CUB_200_2011"
    (folder / "images" / CUB_CLASSES[3] / "Bird_D_0001.jpg").write_bytes(
        b"GIF89a broken"
    )
    with pytest.raises(DataError, match=r"Bird_D_0001\.jpg is not a readable image"):
        CUB(cub_root, split="test", image_size=16)
    (folder / "images" / CUB_CLASSES[1]).rename(folder / "images" / "moved")
    with pytest.raises(
        DataError, match=r"lists class 002\.Bird_B but .* does not exist"
    ):
        CUB(cub_root, split="val")
    (folder / "classes.txt").write_text("1 001.Bird_A\nbroken line\n")
    with pytest.raises(
        DataError, match=r"classes\.txt:2: expected '<id> <class folder>'"
    ):
        CUB(cub_root, split="train")
    (folder / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes\.txt not found"):
        CUB(cub_root, split="train")


def test_read_name_list_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.txt"):
        read_name_list(tmp_path / "missing.txt")
