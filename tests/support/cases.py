"""Test cases built from tiny checkpoints: built once per module on first use, compiled variants of one
checkpoint, and the tiny Llama plan the engine and serving tests share."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import rdnac
from tests.support.checkpoints import make_checkpoint


def built_once(build: Callable[[str, Path], object], names: list[str]):
    """Two fixtures for a module's cases: `checkpoints` (module-scoped), name -> build(name, a fresh temporary
    folder), built once per module on first use; and `case`, parametrized over `names`, each one's build.
    Assign them as `checkpoints, case = built_once(...)`: pytest finds a fixture under its own name."""
    @pytest.fixture(scope="module")
    def checkpoints(tmp_path_factory):
        built = {}

        def get(name: str):
            if name not in built:
                built[name] = build(name, tmp_path_factory.mktemp(name))
            return built[name]
        return get

    @pytest.fixture(params=names)
    def case(request, checkpoints):
        return checkpoints(request.param)
    return checkpoints, case


def compile_variant(root: Path, name: str, **changes):
    """The checkpoint root/ckpt with its config.json changed (weights shared), compiled for cpu and loaded."""
    src, dst = root / "ckpt", root / name
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return rdnac.load(rdnac.compile(dst, target="cpu", output=root / f"{name}.msgpack", quiet=True))


def tiny_llama_plan(directory: Path) -> Path:
    """A tiny random Llama checkpoint in directory/ckpt compiled for cpu; returns the plan's path."""
    make_checkpoint("llama", directory / "ckpt")
    return rdnac.compile(directory / "ckpt", target="cpu", output=directory / "llama.msgpack", quiet=True)
