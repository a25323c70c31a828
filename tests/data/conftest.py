"""Fixtures for the data tests: tiny fake Omniglot zips in the official layout.

Every test here runs with ``METAXFER_CACHE`` pointing into its own tmp folder and
``METAXFER_DATA`` unset, and with metaxfer's in-process decode memo cleared, so
tests never touch ``~/.cache`` or a real data folder and never see each other's
decoded zips.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_omniglot import BACKGROUND, EVALUATION, SPLITS, write_omniglot_zip

from metaxfer.data import omniglot as omniglot_module


@pytest.fixture(autouse=True)
def _isolated_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("METAXFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("METAXFER_DATA", raising=False)
    omniglot_module.clear_memory_cache()
    yield
    omniglot_module.clear_memory_cache()


@pytest.fixture(scope="session")
def _fake_root_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("omniglot_fake")
    write_omniglot_zip(root / "images_background.zip", BACKGROUND, seed=0)
    write_omniglot_zip(root / "images_evaluation.zip", EVALUATION, seed=1)
    return root


@pytest.fixture
def fake_root(_fake_root_master: Path, tmp_path: Path) -> Path:
    """A per-test copy of the fake data root (tests may damage it)."""
    root = tmp_path / "omniglot"
    shutil.copytree(_fake_root_master, root)
    return root


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    """train/val/test.txt for the fake data (3 / 2 / 3 characters)."""
    folder = tmp_path / "splits"
    folder.mkdir()
    for name, chars in SPLITS.items():
        (folder / f"{name}.txt").write_text("\n".join(chars) + "\n")
    return folder


@pytest.fixture
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts calls of the zip decoder (the slow path); returns a getter."""
    calls: list[str] = []
    real = omniglot_module._decode_zip

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(omniglot_module, "_decode_zip", counting)
    return lambda: len(calls)
