"""Dataset registry and data/cache root resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaxfer.data import DATASETS, Omniglot, create_dataset, resolve_data_root
from metaxfer.data.paths import resolve_cache_dir
from metaxfer.errors import ConfigError, DataError


def test_omniglot_is_registered(fake_root: Path) -> None:
    assert "omniglot" in DATASETS.names()
    ds = create_dataset("omniglot", split="test", root=fake_root, protocol="lake")
    assert isinstance(ds, Omniglot) and ds.split == "test"


def test_unknown_dataset_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="omniglot"):
        create_dataset("no_such_dataset", split="train")  # (mnist is registered now)


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_root(tmp_path) == tmp_path
    monkeypatch.setenv("METAXFER_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path / "omniglot"
    assert resolve_data_root(tmp_path / "x") == tmp_path / "x"  # the argument wins
    monkeypatch.delenv("METAXFER_DATA")
    with pytest.raises(DataError, match="METAXFER_DATA"):
        resolve_data_root()


def test_resolve_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAXFER_CACHE", str(tmp_path))
    assert resolve_cache_dir("omniglot") == tmp_path / "omniglot"
    monkeypatch.delenv("METAXFER_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir("omniglot") == tmp_path / "xdg" / "metaxfer" / "omniglot"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_cache_dir("omniglot") == Path.home() / ".cache" / "metaxfer" / "omniglot"
