"""The real Omniglot zips (slow: the first decode of 32,460 PNGs takes 5-30 s).

Runs when the data is present at ``$METAXFER_DATA/omniglot`` or
``../shared/data/omniglot`` next to the repository; skipped otherwise. Never downloads.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaxfer.data import Omniglot
from metaxfer.data import omniglot as omniglot_module

REPO = Path(__file__).resolve().parents[2]


def _real_root() -> Path | None:
    # Read at import time: the autouse fixture of tests/data unsets METAXFER_DATA for each test.
    for base in (os.environ.get("METAXFER_DATA"), str(REPO.parent / "shared" / "data")):
        if base and (Path(base) / "omniglot" / "images_background.zip").is_file():
            return Path(base) / "omniglot"
    return None


REAL_ROOT = _real_root()


@pytest.mark.slow
@pytest.mark.skipif(REAL_ROOT is None, reason="real Omniglot zips not found ($METAXFER_DATA/omniglot or ../shared/data/omniglot)")
def test_real_omniglot_vinyals_and_lake() -> None:
    assert REAL_ROOT is not None
    start = time.perf_counter()
    train = Omniglot(root=REAL_ROOT, protocol="vinyals", split="train")
    first_load = time.perf_counter() - start
    sets = {"train": train, **{s: Omniglot(root=REAL_ROOT, split=s) for s in ("val", "test", "trainval")}}

    for split, n_chars in {"train": 1028, "val": 172, "test": 423, "trainval": 1200}.items():
        ds = sets[split]
        assert len(ds.characters) == n_chars
        assert ds.num_classes == 4 * n_chars and len(ds) == 4 * n_chars * 20
        assert torch.equal(torch.bincount(ds.labels), torch.full((4 * n_chars,), 20))
    chars = [set(sets[s].characters) for s in ("train", "val", "test")]
    assert not (chars[0] & chars[1]) and not (chars[0] & chars[2]) and not (chars[1] & chars[2])
    assert len(chars[0] | chars[1] | chars[2]) == 1623

    x = train.gather(torch.arange(0, len(train), 97))
    assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert float(x.mean()) < 0.3  # strokes (1) are a small part of the paper (0)

    # The dataset tensor is exactly ImagePreprocess applied to the original PNG.
    with zipfile.ZipFile(REAL_ROOT / "images_evaluation.zip") as zf:
        for i in (0, 12345, len(sets["test"]) - 80):
            src = sets["test"].source(i)
            if src["zip"] != "images_evaluation.zip" or src["rotation"] != 0:
                continue
            image = Image.open(io.BytesIO(zf.read(src["member"])))
            assert torch.equal(sets["test"].preprocess([image])[0], sets["test"][i][0])

    omniglot_module.clear_memory_cache()  # force the disk cache path, as in a new process
    start = time.perf_counter()
    again = Omniglot(root=REAL_ROOT, protocol="vinyals", split="train")
    second_load = time.perf_counter() - start
    assert torch.equal(again.pixels, train.pixels)
    print(f"\nOmniglot vinyals train: first load {first_load:.1f} s, second load (disk cache) {second_load:.2f} s")
    assert second_load < 2.0

    lake_train = Omniglot(root=REAL_ROOT, protocol="lake", split="train")
    lake_test = Omniglot(root=REAL_ROOT, protocol="lake", split="test")
    assert (lake_train.num_classes, lake_test.num_classes) == (964, 659)
    assert len(lake_train) == 964 * 20 and len(lake_test) == 659 * 20
