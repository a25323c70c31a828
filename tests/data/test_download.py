"""download_omniglot without a network: urllib is monkeypatched, nothing is fetched."""

from __future__ import annotations

import hashlib
import io
import urllib.error
from pathlib import Path

import pytest

from metaxfer.data import download as download_module
from metaxfer.data import download_omniglot
from metaxfer.errors import DataError


def _serve(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[str]:
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0):
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(download_module.urllib.request, "urlopen", fake_urlopen)
    return urls


def test_checksum_mismatch_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = _serve(monkeypatch, b"<html>rate limited</html>")
    with pytest.raises(DataError) as e:
        download_omniglot(tmp_path)
    msg = str(e.value)
    assert "checksum mismatch" in msg and "images_background.zip" in msg and download_module.OMNIGLOT_MD5["images_background.zip"] in msg
    assert urls == [download_module.OMNIGLOT_URLS["images_background.zip"]]
    assert list(tmp_path.iterdir()) == []  # no zip, no .part


def test_verified_download_is_renamed_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"pretend zip bytes"
    for name in download_module.OMNIGLOT_MD5:
        monkeypatch.setitem(download_module.OMNIGLOT_MD5, name, hashlib.md5(payload).hexdigest())
    _serve(monkeypatch, payload)
    sha = hashlib.sha256(payload).hexdigest()
    root = download_omniglot(tmp_path / "omniglot", sha256={"images_evaluation.zip": sha})
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert (root / "images_background.zip").read_bytes() == payload


def test_user_sha256_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"pretend zip bytes"
    monkeypatch.setitem(download_module.OMNIGLOT_MD5, "images_background.zip", hashlib.md5(payload).hexdigest())
    _serve(monkeypatch, payload)
    with pytest.raises(DataError, match="sha256"):
        download_omniglot(tmp_path, sha256={"images_background.zip": "0" * 64})
    assert not (tmp_path / "images_background.zip").exists()


def test_existing_files_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in download_module.OMNIGLOT_URLS:
        (tmp_path / name).write_bytes(b"a re-zipped copy")
    urls = _serve(monkeypatch, b"unused")
    download_omniglot(tmp_path)
    assert urls == [] and (tmp_path / "images_background.zip").read_bytes() == b"a re-zipped copy"


def test_network_error_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float = 0):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(download_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="by hand"):
        download_omniglot(tmp_path)
    assert list(tmp_path.iterdir()) == []
