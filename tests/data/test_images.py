"""ImagePreprocess: the recipe, its two stages, and its dict form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metaxfer.data import ImagePreprocess
from metaxfer.errors import ConfigError


def _character(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    canvas = np.ones((105, 105), dtype=bool)
    canvas[20:80, 40:45] = False
    canvas[rng.integers(0, 105, 200), rng.integers(0, 105, 200)] = False
    return Image.fromarray(canvas)  # mode "1", like the Omniglot PNGs


def test_default_recipe_is_L_lanczos_scaled_and_inverted() -> None:
    image = _character()
    x = ImagePreprocess(size=28)([image])
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32
    expected = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.LANCZOS), dtype=np.float32)
    assert torch.allclose(x[0, 0], torch.from_numpy(1.0 - expected / 255.0), atol=1e-6)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # grey levels prove LANCZOS ran on "L": Pillow resizes mode "1" with NEAREST (only 0 / 1)
    assert len(torch.unique(x)) > 2


def test_call_is_from_pixels_of_to_pixels() -> None:
    pre = ImagePreprocess(size=(20, 24), invert=False, mean=0.5, std=0.25)
    images = [_character(0), _character(1)]
    pixels = pre.to_pixels(images)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 1, 20, 24)
    assert torch.equal(pre(images), pre.from_pixels(pixels))
    assert torch.allclose(pre(images), (pixels.float() / 255 - 0.5) / 0.25)


def test_from_pixels_commutes_with_rot90() -> None:
    pre = ImagePreprocess(size=28)
    pixels = pre.to_pixels([_character()])
    assert torch.equal(pre.from_pixels(torch.rot90(pixels, 1, dims=(-2, -1))), torch.rot90(pre.from_pixels(pixels), 1, dims=(-2, -1)))


def test_rgb_has_three_channels_and_per_channel_normalisation() -> None:
    pre = ImagePreprocess(size=8, mode="RGB", invert=False, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 4.0))
    x = pre([Image.new("RGB", (16, 16), (255, 0, 255))])
    assert x.shape == (1, 3, 8, 8)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([0.9, -0.1, 0.175]))


def test_dict_round_trip_through_json() -> None:
    pre = ImagePreprocess(size=(28, 32), mode="L", invert=False, resample="BICUBIC", mean=[0.5], std=0.2)
    again = ImagePreprocess.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again == pre and again.resample == "bicubic" and again.size == (28, 32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 0}, "positive"),
        ({"size": (1, 2, 3)}, "height, width"),
        ({"size": 28, "resample": "cubic-ish"}, "lanczos"),
        ({"size": 28, "mode": "XYZ"}, "mode"),
        ({"size": 28, "mean": (0.1, 0.2)}, "one value per channel"),
        ({"size": 28, "std": 0.0}, "positive"),
    ],
)
def test_invalid_settings_raise_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ImagePreprocess(**kwargs)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="unknown ImagePreprocess keys"):
        ImagePreprocess.from_dict({"size": 28, "colour": "red"})
