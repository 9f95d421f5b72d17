"""Launch a plan's precompiled kernels: hsaco/cubin loaded through Triton's driver, never compiled.

`AotLauncher` implements the same `launch(kernel, grid, args, *, constexprs,
num_warps, num_stages)` as the other launchers, so the kernel wrappers run
unchanged over a plan's binaries. At construction it checks the plan's target
against the running GPU, each binary's sha256, and the Triton version that
built it; at each launch it finds the binary by the same specialization key
`RecordingLauncher` produced and checks the alignment/divisibility the binary
assumes against the actual arguments. A launch with no binary is an error,
never a JIT. Imports nothing from `rdnac.compiler`.

Loading reuses Triton's own `CompiledKernel` (built from the metadata JSON and
the binary, as Triton does from its cache directory). Its launcher is not a
kernel compile, but note: Triton 3.6 builds a small C host stub per argument
signature with the system C compiler on first use (cached in ~/.triton/cache);
Triton 3.9 launches through a generic launcher compiled into libtriton.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rdnac.errors import PlanError, TargetError
from rdnac.kernels.launch import (decode_constexpr, divisible_args, full_constexprs, kernel_name, resolve_kernel,
                                  spec_key, triton_type)
from rdnac.kernels.binaries import KernelBinary, sha256_hex
from rdnac.targets import get_target


@dataclass
class _Loaded:
    binary: KernelBinary
    compiled: Any  # triton.compiler.CompiledKernel
    constexpr_slots: list[tuple[int, Any]]  # (parameter index, value) to splice into the args
    aligned: list[tuple[int, str]]  # (runtime arg index, name) assumed 16-byte aligned
    divisible: list[tuple[int, str]]  # (runtime arg index, name) assumed divisible by 16


class _PlanSource:
    """What Triton's launcher reads from a compile source: the full signature and the constants."""

    def __init__(self, signature: dict[str, str], constants: dict[tuple[int], Any]) -> None:
        self.signature = signature
        self.constants = constants  # keyed by (parameter index,), as ASTSource stores them


def device_arch(device: Any) -> tuple[str, str]:
    """(rdnac-style arch name, GPU name) of a torch cuda device: ("gfx1201", ...) on ROCm, ("sm90", ...) on NVIDIA."""
    import torch

    props = torch.cuda.get_device_properties(device)
    if torch.version.hip:
        return props.gcnArchName.split(":")[0], props.name
    return f"sm{props.major}{props.minor}", props.name


def check_target(target_name: str, device: Any) -> None:
    """Raise TargetError unless the running GPU is the plan's target."""
    target = get_target(target_name)
    arch, gpu = device_arch(device)
    expected = target.arch if target.backend == "hip" else f"sm{target.arch}"
    if arch != expected:
        from rdnac.targets import TARGETS

        fix = f"compile the plan with --target {arch}" if arch in TARGETS else \
            f"run it on a {target.name} GPU ({arch} is not an rdnac target; known: {', '.join(TARGETS)})"
        raise TargetError(f"this plan's kernels require a {target.name} GPU ({target.description}); "
                          f"got {gpu} ({arch}); do {fix}")


def rebuild(binary: dict[str, Any]) -> dict[str, Any]:
    """Recompile one kernel with the installed Triton, from rdnac's installed kernel library (by
    "module:function", never from code in the plan), with the same specialization and target."""
    from rdnac.kernels.binaries import compile_call  # the one path where the runtime compiles, on request

    old = KernelBinary.from_dict(binary)
    return compile_call(old.call, old.target).to_dict()


def is_stale(binary: KernelBinary) -> str:
    """Why `binary` cannot be loaded as is (another Triton, changed kernel source), or ""."""
    import triton

    if binary.triton_version != triton.__version__:
        return f"built by Triton {binary.triton_version}, installed is {triton.__version__}"
    if resolve_kernel(binary.kernel).cache_key != binary.source_hash:
        return "the installed kernel source differs from the one it was built from"
    return ""


class AotLauncher:
    """Run kernels from a plan's binaries (dicts as stored in the plan) on one GPU."""

    def __init__(self, binaries: list[dict[str, Any]], device: Any = "cuda", *, allow_rebuild: bool = True) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device(self.device.type, torch.cuda.current_device())
        self._kernels: dict[str, _Loaded] = {}
        self._memo: dict[tuple, _Loaded] = {}
        self.rebuilt: list[str] = []  # keys of kernels rebuilt at load, for the engine to report
        for d in binaries:
            binary = KernelBinary.from_dict(d)
            check_target(binary.target, self.device)
            if sha256_hex(binary.binary) != binary.sha256:
                raise PlanError(f"kernel {binary.kernel} ({binary.key}) requires a binary matching its recorded "
                                f"sha256 {binary.sha256[:16]}...; got {sha256_hex(binary.binary)[:16]}...; "
                                f"the plan file is corrupt: do recompile it")
            reason = is_stale(binary)
            if reason:
                if not allow_rebuild:
                    raise PlanError(f"kernel {binary.key} requires the Triton and kernel library it was built "
                                    f"with; it was {reason}; do recompile the plan on this machine")
                try:
                    binary = KernelBinary.from_dict(rebuild(d))
                except Exception as e:
                    raise PlanError(f"kernel {binary.key} was {reason} and requires a rebuild from rdnac's "
                                    f"installed kernel library; that failed ({type(e).__name__}: {e}); "
                                    f"do recompile the plan on this machine") from e
                self.rebuilt.append(binary.key)
                stale_reason = reason
            self._kernels[binary.key] = self._load(binary)
        if self.rebuilt:  # one warning for the plan, not one per kernel
            warnings.warn(f"rdnac: {len(self.rebuilt)} kernel(s) of this plan were {stale_reason}; rebuilt them "
                          f"from rdnac's installed kernel library (recompile the plan to skip this)", stacklevel=2)

    def _load(self, binary: KernelBinary) -> _Loaded:
        import torch
        from triton.compiler.compiler import CompiledKernel

        kernel = resolve_kernel(binary.kernel)
        call = binary.call
        signature = {p.name: "constexpr" if p.is_constexpr else call.signature[p.name] for p in kernel.params}
        slots = [(i, p.name) for i, p in enumerate(kernel.params) if p.is_constexpr]
        constexprs = [(i, decode_constexpr(call.constexprs[name])) for i, name in slots]
        src = _PlanSource(signature, {(i,): v for i, v in constexprs})
        name = binary.metadata["name"]
        with tempfile.TemporaryDirectory(prefix="rdnac-aot-") as tmp:
            # CompiledKernel reads its metadata group (the files Triton's cache holds) eagerly.
            group = {f"{name}.json": str(Path(tmp) / f"{name}.json"),
                     f"{name}.{binary.binary_ext}": str(Path(tmp) / f"{name}.{binary.binary_ext}")}
            Path(group[f"{name}.json"]).write_text(json.dumps(binary.metadata))
            Path(group[f"{name}.{binary.binary_ext}"]).write_bytes(binary.binary)
            compiled = CompiledKernel(src, group, binary.metadata["hash"])
        with torch.cuda.device(self.device):
            compiled.run  # noqa: B018 -- loads the module now, not inside a later graph capture
        runtime = [p.name for p in kernel.params if not p.is_constexpr]
        return _Loaded(binary, compiled, constexprs,
                       [(runtime.index(a), a) for a in call.aligned],
                       [(runtime.index(a), a) for a in call.divisible])

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        import torch

        divisible = divisible_args(kernel, args)
        memo_key = (id(kernel), tuple(triton_type(a) for a in args), tuple(sorted(constexprs.items())),
                    num_warps, num_stages, divisible)
        loaded = self._memo.get(memo_key)
        if loaded is None:
            key = spec_key(kernel_name(kernel), memo_key[1], full_constexprs(kernel, constexprs),
                           num_warps, num_stages, divisible)
            loaded = self._kernels.get(key)
            if loaded is None:
                raise PlanError(self._missing(kernel_name(kernel), key))
            self._memo[memo_key] = loaded
        self._check_assumptions(loaded, args)
        full = list(args)
        for i, value in loaded.constexpr_slots:
            full.insert(i, value)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if torch.cuda.current_device() != self.device.index:
            with torch.cuda.device(self.device):
                loaded.compiled[grid](*full)
        else:
            loaded.compiled[grid](*full)

    def _check_assumptions(self, loaded: _Loaded, args) -> None:
        for i, name in loaded.aligned:
            if args[i].data_ptr() % 16:
                raise PlanError(f"kernel {loaded.binary.kernel} requires argument {name} 16-byte aligned (its "
                                f"binary assumes it); got address {args[i].data_ptr():#x}; do pass an aligned "
                                f"tensor (a fresh allocation, not an odd-offset view)")
        for i, name in loaded.divisible:
            if args[i] % 16:
                raise PlanError(f"kernel {loaded.binary.kernel} requires argument {name} divisible by 16 (its "
                                f"binary assumes it); got {args[i]}; do recompile without that assumption")

    def _missing(self, kernel: str, key: str) -> str:
        known = [k for k, v in self._kernels.items() if v.binary.kernel == kernel]
        listing = "\n  ".join(known) if known else "(none for this kernel)"
        return (f"kernel {kernel} requires a precompiled binary for specialization {key}; the plan has:\n  "
                f"{listing}\ndo recompile the plan (this launch was not recorded when it was built)")
