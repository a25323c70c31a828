"""ImageFolder: the labelled folders users bring (root/CLASS/*.png), mixed sizes/modes and bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from metaxfer.data import create_dataset
from metaxfer.data.image_folder import (
    ImageFolder,
    UnreadableImageWarning,
    list_images,
    open_image,
)
from metaxfer.data.images import ImagePreprocess
from metaxfer.errors import DataError
from metaxfer.tasks.sampler import EpisodeSampler


def shape_image(shape: str, size: int = 40, mode: str = "L") -> Image.Image:
    """A dark outline shape on white paper."""
    image = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(image)
    a, b = size // 5, size - size // 5
    if shape == "circle":
        draw.ellipse([a, a, b, b], outline=0, width=3)
    elif shape == "square":
        draw.rectangle([a, a, b, b], outline=0, width=3)
    else:
        draw.line([a, a, b, b], fill=0, width=3)
        draw.line([a, b, b, a], fill=0, width=3)
    return image.convert(mode)


def make_folder(root: Path, classes: dict[str, int]) -> Path:
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape_image(c if c in ("circle", "square") else "cross").save(root / c / f"{i}.png")
    return root


def test_loads_labels_and_works_with_the_sampler(tmp_path):
    root = make_folder(tmp_path / "data", {"circle": 4, "square": 4, "cross": 4})
    (root / "notes.txt").write_text("ignored")
    (root / "circle" / ".DS_Store").write_bytes(b"\0")
    data = ImageFolder(root, image_size=16, mode="L", invert=True)
    assert data.class_names == ["circle", "cross", "square"]
    assert data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.pixels.shape == (12, 1, 16, 16) and data.pixels.dtype == torch.uint8
    x, y = data[5]
    assert x.shape == (1, 16, 16) and y == 1 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # Identical to preprocessing the file directly, as a trained learner would.
    torch.testing.assert_close(data.gather(torch.tensor([0]))[0], data.preprocess([Image.open(data.files[0])])[0])
    episode = EpisodeSampler(data, ways=3, shots=1, queries=2, seed=0).sample_batch(1)
    assert episode.support_x.shape == (1, 3, 1, 16, 16) and episode.query_x.shape == (1, 6, 1, 16, 16)
    assert data.describe()["classes"] == 3


def test_registered_with_split_subfolders(tmp_path):
    make_folder(tmp_path / "d" / "train", {"circle": 2, "square": 2})
    make_folder(tmp_path / "d" / "test", {"cross": 2, "circle": 2})
    train = create_dataset("image_folder", split="train", root=tmp_path / "d", image_size=8, mode="L")
    test = create_dataset("image_folder", split="test", root=tmp_path / "d", image_size=8, mode="L")
    assert train.class_names == ["circle", "square"] and test.class_names == ["circle", "cross"]
    flat = create_dataset("image_folder", split="train", root=tmp_path / "d" / "test", image_size=8, mode="L")
    assert flat.class_names == ["circle", "cross"]  # no train/ inside: the folder itself


def test_mixed_sizes_and_modes_are_converted(tmp_path):
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    shape_image("circle", 40, "L").save(root / "a" / "gray.png")
    shape_image("circle", 97, "RGB").save(root / "a" / "rgb.jpg")
    shape_image("circle", 23, "1").save(root / "a" / "bits.bmp")
    shape_image("square", 64, "P").save(root / "b" / "palette.gif")
    rgba = Image.new("RGBA", (30, 50), (0, 0, 0, 0))  # fully transparent: composited on white paper
    ImageDraw.Draw(rgba).rectangle([5, 5, 25, 45], outline=(0, 0, 0, 255), width=3)
    rgba.save(root / "b" / "alpha.png")
    Image.fromarray((torch.arange(0, 60000, 60000 // 400)[:400].view(20, 20).numpy()).astype("uint16")).save(root / "b" / "deep.png")
    shape_image("square", 33, "RGB").save(root / "b" / "photo.webp")
    for mode, channels in (("L", 1), ("RGB", 3)):
        data = ImageFolder(root, image_size=(12, 10), mode=mode)
        assert data.pixels.shape == (7, channels, 12, 10)
    data = ImageFolder(root, image_size=16, mode="L")
    alpha = data.pixels[[f.name for f in data.files].index("alpha.png")]
    assert int(alpha[0, 0, 0]) == 255  # transparent corner became white, not black
    deep = data.pixels[[f.name for f in data.files].index("deep.png")]
    assert int(deep.max()) > 200 and int(deep.min()) < 30  # 16-bit range rescaled, not clipped at 255


def test_unreadable_image_is_named_and_skipped(tmp_path):
    root = make_folder(tmp_path / "d", {"circle": 3, "square": 2})
    (root / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.warns(UnreadableImageWarning, match=r"skipped 1 unreadable .*square/broken\.png"):
        data = ImageFolder(root, image_size=8, mode="L")
    assert len(data) == 5 and [p for p, _ in data.skipped] == [root / "square" / "broken.png"]
    with pytest.raises(DataError, match=r"broken\.png is not a readable image"):
        open_image(root / "square" / "broken.png")


def test_class_with_only_unreadable_images(tmp_path):
    root = make_folder(tmp_path / "d", {"circle": 2})
    (root / "square").mkdir()
    (root / "square" / "bad.jpg").write_bytes(b"nope")
    with pytest.warns(UnreadableImageWarning, match="bad.jpg"), pytest.raises(DataError, match=r"no readable image: .*square"):
        ImageFolder(root, image_size=8)


def test_one_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", {"circle": 3})
    with pytest.raises(DataError, match=r"1 class folder\(s\) \(circle\) but at least 2 are needed to classify; add a folder per class"):
        ImageFolder(root, image_size=8)


def test_empty_class_is_an_error(tmp_path):
    root = make_folder(tmp_path / "d", {"circle": 2, "square": 2})
    (root / "triangle").mkdir()
    (root / "triangle" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder\(s\) with no images: .*triangle; put at least one"):
        ImageFolder(root, image_size=8)


def test_no_class_folders_and_missing_root(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    shape_image("circle").save(flat / "a.png")
    with pytest.raises(DataError, match=r"no class folders.*holds 1 images directly \(a.png\): move them"):
        ImageFolder(flat, image_size=8)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope", image_size=8)


def test_loose_images_warned(tmp_path):
    root = make_folder(tmp_path / "d", {"circle": 1, "square": 1})
    shape_image("circle").save(root / "stray.png")
    with pytest.warns(UserWarning, match=r"stray.png"):
        data = ImageFolder(root, image_size=8)
    assert len(data) == 2


def test_learner_preprocess_is_used(tmp_path):
    root = make_folder(tmp_path / "d", {"circle": 1, "square": 1})
    pre = ImagePreprocess(size=28, mode="L", invert=True)
    data = ImageFolder(root, preprocess=pre.to_dict())
    assert data.preprocess == pre and data.pixels.shape == (2, 1, 28, 28)


def test_list_images_recursive_sorted(tmp_path):
    (tmp_path / "q" / "sub").mkdir(parents=True)
    (tmp_path / "q" / ".hidden").mkdir()
    for p in ("q/b.PNG", "q/sub/a.jpeg", "q/.hidden/x.png", "q/c.txt"):
        (tmp_path / p).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path / "q")] == ["q/b.PNG", "q/sub/a.jpeg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_images(tmp_path / "missing") == []
