"""Omniglot on tiny fake zips: loading, splits, rotations, caching, preprocessing and every error path."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from fake_omniglot import BACKGROUND, EVALUATION, SPLITS, write_omniglot_zip
from PIL import Image

from metaxfer.data import Omniglot
from metaxfer.data import omniglot as omniglot_module
from metaxfer.errors import ConfigError, DataError
from metaxfer.tasks import EpisodeSampler


def _member_image(root: Path, zip_name: str, member: str) -> Image.Image:
    with zipfile.ZipFile(root / zip_name) as zf:
        image = Image.open(io.BytesIO(zf.read(member)))
        image.load()
    return image


# ------------------------------------------------------------------ loading and splits


def test_lake_train_loads_background_alphabets(fake_root: Path) -> None:
    ds = Omniglot(root=fake_root, protocol="lake", split="train", image_size=28)
    assert ds.num_classes == sum(BACKGROUND.values()) == 5
    assert len(ds) == 5 * 20
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (100,)
    assert torch.equal(torch.bincount(ds.labels), torch.full((5,), 20))
    assert ds.class_names[0] == "Alpha_A/character01/rot000"
    assert ds.class_names == sorted(ds.class_names)
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 0
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # strokes are 1 on a 0 background: most of the paper is background
    assert float(ds.gather(torch.arange(len(ds))).mean()) < 0.5


def test_lake_test_loads_evaluation_alphabets(fake_root: Path) -> None:
    ds = Omniglot(root=fake_root, protocol="lake", split="test", image_size=20)
    assert ds.num_classes == sum(EVALUATION.values())
    assert all(name.startswith("Gamma_C/") for name in ds.class_names)
    assert ds[0][0].shape == (1, 20, 20)


def test_lake_train_needs_only_background_zip(fake_root: Path) -> None:
    (fake_root / "images_evaluation.zip").unlink()
    assert Omniglot(root=fake_root, protocol="lake", split="train").num_classes == 5
    with pytest.raises(DataError, match="images_evaluation.zip"):
        Omniglot(root=fake_root, protocol="lake", split="test")


def test_vinyals_splits_from_split_dir(fake_root: Path, split_dir: Path) -> None:
    sets = {s: Omniglot(root=fake_root, split=s, split_files=split_dir) for s in ("train", "val", "test", "trainval")}
    for s in ("train", "val", "test"):
        assert sets[s].characters == sorted(SPLITS[s])
        assert sets[s].num_classes == 4 * len(SPLITS[s])
        assert len(sets[s]) == 4 * len(SPLITS[s]) * 20
    assert sets["trainval"].characters == sorted(SPLITS["train"] + SPLITS["val"])
    chars = [set(sets[s].characters) for s in ("train", "val", "test")]
    assert not (chars[0] & chars[1]) and not (chars[0] & chars[2]) and not (chars[1] & chars[2])
    # class order: by character, then rotation
    assert sets["train"].class_names[:5] == [
        "Alpha_A/character01/rot000", "Alpha_A/character01/rot090", "Alpha_A/character01/rot180",
        "Alpha_A/character01/rot270", "Alpha_A/character02/rot000",
    ]


def test_vinyals_split_files_mapping_with_lists(fake_root: Path) -> None:
    ds = Omniglot(root=fake_root, split="val", split_files={"val": ["Gamma_C/character02", "Beta_B/character01"]}, rotations=(0,))
    assert ds.characters == ["Beta_B/character01", "Gamma_C/character02"]
    assert ds.num_classes == 2


def test_rotations_are_rot90_of_the_unrotated_image(fake_root: Path, split_dir: Path) -> None:
    ds = Omniglot(root=fake_root, split="train", split_files=split_dir, rotations=(270, 0, 90, 180, 360))
    assert ds.rotations == (0, 90, 180, 270)  # sorted, 360 == 0
    per_class = ds.labels.eq(0).sum().item()
    for k, r in enumerate(ds.rotations):
        label = ds.class_names.index(f"Alpha_A/character02/rot{r:03d}")
        idx = torch.nonzero(ds.labels == label).flatten()
        base = torch.nonzero(ds.labels == ds.class_names.index("Alpha_A/character02/rot000")).flatten()
        assert len(idx) == per_class == 20
        assert torch.equal(ds.pixels[idx], torch.rot90(ds.pixels[base], k, dims=(-2, -1)))
        assert ds.source(int(idx[3])) == {**ds.source(int(base[3])), "rotation": r}


def test_lake_rotations_override(fake_root: Path) -> None:
    ds = Omniglot(root=fake_root, protocol="lake", split="train", rotations=(0, 180))
    assert ds.num_classes == 10 and ds.class_names[1] == "Alpha_A/character01/rot180"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rotations": (45,)}, "multiples of 90"),
        ({"rotations": ()}, "multiples of 90"),
        ({"protocol": "vinyalz"}, "vinyals, lake"),
        ({"protocol": "lake", "split": "val"}, "train, test"),
        ({"split": "validation"}, "train, val, test, trainval"),
        ({"protocol": "lake", "split_files": {"train": []}}, "vinyals"),
    ],
)
def test_bad_arguments_raise_config_error(fake_root: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Omniglot(root=fake_root, **kwargs)


def test_gather_matches_getitem(fake_root: Path, split_dir: Path) -> None:
    ds = Omniglot(root=fake_root, split="test", split_files=split_dir)
    idx = torch.tensor([0, 7, 59, len(ds) - 1])
    batch = ds.gather(idx)
    assert batch.shape == (4, 1, 28, 28) and batch.dtype == torch.float32
    for row, i in zip(batch, idx.tolist()):
        assert torch.equal(row, ds[i][0])
    assert ds.gather(idx.view(2, 2)).shape == (2, 2, 1, 28, 28)


def test_preprocess_of_the_png_equals_the_dataset_tensor(fake_root: Path) -> None:
    ds = Omniglot(root=fake_root, protocol="lake", split="train")
    for i in (0, 21, 99):
        src = ds.source(i)
        image = _member_image(fake_root, src["zip"], src["member"])
        assert image.mode == "1" and image.size == (105, 105)
        assert torch.equal(ds.preprocess([image])[0], ds[i][0])  # bit for bit


def test_works_with_episode_sampler(fake_root: Path, split_dir: Path) -> None:
    ds = Omniglot(root=fake_root, split="train", split_files=split_dir)
    episode = EpisodeSampler(ds, ways=5, shots=1, queries=3, seed=0).sample()
    assert episode.support_x.shape == (5, 1, 28, 28) and episode.query_x.shape == (15, 1, 28, 28)


def test_describe_is_json_and_identifies_the_data(fake_root: Path, split_dir: Path) -> None:
    d = Omniglot(root=fake_root, split="val", split_files=split_dir).describe()
    json.dumps(d)
    assert d["protocol"] == "vinyals" and d["split"] == "val" and d["classes"] == 8 and d["examples"] == 160
    assert set(d["zips_sha256"]) == {"images_background.zip", "images_evaluation.zip"}
    assert d["preprocess"]["size"] == 28


def test_root_from_metaxfer_data(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = fake_root.parent / "data"
    data.mkdir()
    fake_root.rename(data / "omniglot")
    monkeypatch.setenv("METAXFER_DATA", str(data))
    assert Omniglot(protocol="lake", split="test").root == data / "omniglot"


# ------------------------------------------------------------------ caching


def test_second_load_comes_from_disk_cache(fake_root: Path, tmp_path: Path, count_decodes, monkeypatch) -> None:
    first = Omniglot(root=fake_root, protocol="lake", split="train")
    assert count_decodes() == 1
    files = list((tmp_path / "cache" / "omniglot").glob("images_background-*.safetensors"))
    assert len(files) == 1 and not list(files[0].parent.glob("*.tmp"))
    omniglot_module.clear_memory_cache()

    def fail(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(omniglot_module, "_decode_zip", fail)
    second = Omniglot(root=fake_root, protocol="lake", split="train")
    assert torch.equal(first.pixels, second.pixels) and torch.equal(first.labels, second.labels)
    assert second.class_names == first.class_names
    assert second.source(5) == first.source(5)


def test_splits_in_one_process_decode_each_zip_once(fake_root: Path, split_dir: Path, count_decodes) -> None:
    for split in ("train", "val", "test", "trainval"):
        Omniglot(root=fake_root, split=split, split_files=split_dir, cache=False)
    assert count_decodes() == 2  # background + evaluation, once each


def test_cache_false_writes_nothing(fake_root: Path, tmp_path: Path) -> None:
    Omniglot(root=fake_root, protocol="lake", split="test", cache=False)
    assert not (tmp_path / "cache").exists()


def test_cache_folder_argument(fake_root: Path, tmp_path: Path) -> None:
    Omniglot(root=fake_root, protocol="lake", split="test", cache=tmp_path / "mine")
    assert len(list((tmp_path / "mine").glob("images_evaluation-*.safetensors"))) == 1


def test_changed_zip_invalidates_cache(fake_root: Path, count_decodes) -> None:
    first = Omniglot(root=fake_root, protocol="lake", split="train")
    omniglot_module.clear_memory_cache()
    write_omniglot_zip(fake_root / "images_background.zip", BACKGROUND, seed=7)  # same names, other images
    second = Omniglot(root=fake_root, protocol="lake", split="train")
    assert count_decodes() == 2
    assert not torch.equal(first.pixels, second.pixels)
    assert first.describe()["zips_sha256"] != second.describe()["zips_sha256"]


def test_other_image_size_is_another_cache_entry(fake_root: Path, count_decodes) -> None:
    a = Omniglot(root=fake_root, protocol="lake", split="test", image_size=28)
    b = Omniglot(root=fake_root, protocol="lake", split="test", image_size=14)
    assert count_decodes() == 2 and a[0][0].shape == (1, 28, 28) and b[0][0].shape == (1, 14, 14)


def test_corrupted_cache_file_is_rebuilt(fake_root: Path, tmp_path: Path, count_decodes) -> None:
    first = Omniglot(root=fake_root, protocol="lake", split="test")
    (file,) = (tmp_path / "cache" / "omniglot").glob("*.safetensors")
    file.write_bytes(file.read_bytes()[:100])
    omniglot_module.clear_memory_cache()
    with pytest.warns(UserWarning, match="cache"):
        second = Omniglot(root=fake_root, protocol="lake", split="test")
    assert count_decodes() == 2 and torch.equal(first.pixels, second.pixels)
    omniglot_module.clear_memory_cache()
    Omniglot(root=fake_root, protocol="lake", split="test")  # rewritten cache is valid again
    assert count_decodes() == 2


# ------------------------------------------------------------------ errors


def test_no_root_and_no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as e:
        Omniglot(protocol="lake")
    msg = str(e.value)
    assert "root=" in msg and "METAXFER_DATA" in msg and "download_omniglot" in msg


def test_missing_zip_names_the_path(fake_root: Path) -> None:
    (fake_root / "images_background.zip").unlink()
    with pytest.raises(DataError) as e:
        Omniglot(root=fake_root, protocol="vinyals", split="train")
    msg = str(e.value)
    assert str(fake_root / "images_background.zip") in msg
    assert "root=" in msg and "METAXFER_DATA" in msg and "download_omniglot" in msg


def test_missing_root_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Omniglot(root=tmp_path / "nowhere", protocol="lake")


def test_root_one_level_too_high_gets_a_hint(fake_root: Path) -> None:
    with pytest.raises(DataError, match="did you mean root="):
        Omniglot(root=fake_root.parent, protocol="lake")


def test_truncated_zip(fake_root: Path) -> None:
    path = fake_root / "images_background.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        Omniglot(root=fake_root, protocol="lake", split="train")
    assert str(path) in str(e.value) and "truncated or corrupted" in str(e.value)


def test_bad_crc_names_zip_and_member(fake_root: Path) -> None:
    path = fake_root / "images_evaluation.zip"
    members = write_omniglot_zip(path, EVALUATION, seed=1, compression=zipfile.ZIP_STORED)
    target = members[7]
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(target)
    raw = bytearray(path.read_bytes())
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[data_start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        Omniglot(root=fake_root, protocol="lake", split="test")
    assert str(path) in str(e.value) and target in str(e.value) and "CRC" in str(e.value)


@pytest.mark.parametrize("payload", [b"this is not a png", "truncated"])
def test_corrupted_png_names_zip_and_member(fake_root: Path, payload) -> None:
    path = fake_root / "images_background.zip"
    target = "images_background/Beta_B/character01/0004_03.png"
    if payload == "truncated":
        with zipfile.ZipFile(path) as zf:
            payload = zf.read(target)[:60]
    write_omniglot_zip(path, BACKGROUND, seed=0, replace={target: payload})
    with pytest.raises(DataError) as e:
        Omniglot(root=fake_root, protocol="lake", split="train")
    assert str(path) in str(e.value) and target in str(e.value) and "not a readable PNG" in str(e.value)


def test_zip_in_wrong_layout(fake_root: Path) -> None:
    path = fake_root / "images_evaluation.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("Gamma_C/character01/0001_01.png", b"")
    with pytest.raises(DataError, match="official Omniglot layout"):
        Omniglot(root=fake_root, protocol="lake", split="test")


def test_split_file_with_characters_the_zips_lack(fake_root: Path, split_dir: Path) -> None:
    (split_dir / "test.txt").write_text("Alpha_A/character01\nKlingon/character09\n")
    with pytest.raises(DataError) as e:
        Omniglot(root=fake_root, split="test", split_files=split_dir)
    msg = str(e.value)
    assert str(split_dir / "test.txt") in msg and "Klingon/character09" in msg and "split_files" in msg


def test_missing_split_file(fake_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="val.txt"):
        Omniglot(root=fake_root, split="val", split_files=tmp_path / "empty")


def test_packaged_vinyals_split_on_fake_data_names_the_packaged_file(fake_root: Path) -> None:
    with pytest.raises(DataError, match=r"omniglot_vinyals.train\.txt"):
        Omniglot(root=fake_root, split="train")
