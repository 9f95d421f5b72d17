"""Kernels for GPU tests built as plans build them: recorded over meta tensors, compiled ahead of time by
parallel workers (one per core) for this machine's GPU, run through the runtime's launcher. A sweep over
hundreds of configs JIT-compiled one after another outlasts a device call (10 minutes); built this way it
takes the machine's cores."""

from __future__ import annotations

from pathlib import Path


def aot_launcher(calls, cache_dir: Path, pdl: bool = False):
    """An `AotLauncher` holding a binary for each recorded `KernelCall` in `calls`, built for GPU 0 (`pdl`:
    the calls were recorded with programmatic dependent launch, as a plan's runtime["pdl"])."""
    from rdnac.compiler.build import compile_calls
    from rdnac.runtime.aot import AotLauncher, device_arch

    arch, _ = device_arch(0)
    binaries = compile_calls(calls, arch, quiet=True, cache_dir=cache_dir)
    return AotLauncher([b.to_dict() for b in binaries], "cuda", pdl=pdl)
