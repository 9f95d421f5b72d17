"""Shared pytest setup: `gpu`-marked tests are skipped where no GPU is visible; `--shard K/N` keeps
every N-th selected test from the K-th (the GPU suite outlasts one device call: run it as N calls)."""

from __future__ import annotations

import pytest
import torch
import triton


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="K/N",
                     help="run only the K-th of N interleaved slices of the selected tests (1 <= K <= N)")


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: the slices split what would run
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if shard:
        k, _, n = shard.partition("/")
        if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
            raise pytest.UsageError(f"--shard requires K/N with 1 <= K <= N; got {shard!r}")
        mine = [i % int(n) == int(k) - 1 for i in range(len(items))]
        config.hook.pytest_deselected(items=[item for item, m in zip(items, mine) if not m])
        items[:] = [item for item, m in zip(items, mine) if m]
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
