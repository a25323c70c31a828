import gc
import logging
import platform

import pytest

from metaxfer import runtime


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget earlier tuning in this process (the mallopt settings themselves are harmless to keep)."""
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.delenv("METAXFER_TUNE_ALLOCATOR", raising=False)


def test_non_glibc_is_a_logged_no_op(fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    with caplog.at_level(logging.DEBUG, logger="metaxfer.runtime"):
        assert runtime.tune_allocator() is False
    assert "not glibc" in caplog.text
    assert runtime.allocator_settings() is None


def test_environment_switch_disables(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAXFER_TUNE_ALLOCATOR", "0")
    assert runtime.tune_allocator() is False
    assert runtime.allocator_settings() is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_settings_applied_once(fresh: None) -> None:
    assert runtime.tune_allocator(trim_threshold=2**40) is True
    settings = runtime.allocator_settings()
    assert settings is not None
    assert settings.trim_threshold == 2**31 - 1  # clamped to what mallopt's int takes
    assert settings.mmap_threshold >= 32 * 1024**2
    assert runtime.tune_allocator() is True  # idempotent
    assert runtime.allocator_settings() is settings
    assert set(settings.as_dict()) == {"mmap_threshold", "trim_threshold", "top_pad", "mmap_max"}


def test_freeze_gc() -> None:
    try:
        assert runtime.freeze_gc() > 0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
