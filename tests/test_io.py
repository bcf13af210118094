"""The cache directory's precedence: $WORKBENCH_CACHE, then the XDG base directory, then ~/.cache."""

from pathlib import Path

from workbench.io import cache_dir


def test_the_cache_honours_workbench_cache_then_xdg_cache_home_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WORKBENCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "workbench"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "workbench" and cache_dir().is_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # set but empty: the default, as the XDG spec says
    assert cache_dir() == Path(tmp_path / "home" / ".cache" / "workbench")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
