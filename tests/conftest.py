"""Shared pytest setup: `gpu`-marked tests are skipped where no GPU is visible."""

from __future__ import annotations

import pytest
import torch
import triton


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU (run on the device machine: make test-gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_compiler(monkeypatch):
    """Any Triton compile or JIT during the test fails it (plans must run from their binaries)."""
    import triton.compiler
    import triton.compiler.compiler
    from triton.runtime.jit import JITFunction

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was compiled at run time")

    monkeypatch.setattr(triton, "compile", refuse)
    monkeypatch.setattr(triton.compiler, "compile", refuse)
    monkeypatch.setattr(triton.compiler.compiler, "compile", refuse)
    monkeypatch.setattr(JITFunction, "run", refuse)
