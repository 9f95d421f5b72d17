"""Record which kernel specializations a program needs, running nothing (over meta tensors).

Kernel selection and `rdnac tune` run the kernel wrappers with a recording
launcher: every launch becomes a `KernelCall` (rdnac.plans.binaries) naming
the kernel, its argument types, every constexpr, warps, stages and the
divisibility of its shape ints, which `rdnac.compiler.build` then compiles.
The runtime's `AotLauncher` derives the same key from the same launch, so a
recorded launch always finds its binary.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import triton

from rdnac.kernels.launch import divisible_args, full_constexprs, kernel_name, triton_type, with_pdl
from rdnac.plans.binaries import KernelCall


def record_call(kernel: triton.JITFunction, args: tuple[Any, ...], constexprs: dict[str, Any],
                num_warps: int = 4, num_stages: int = 2) -> KernelCall:
    """The specialization one launch needs (checks the argument count and constexpr names)."""
    runtime = [p for p in kernel.params if not p.is_constexpr]
    assert len(args) == len(runtime), (f"{kernel_name(kernel)} takes {len(runtime)} runtime args "
                                       f"({', '.join(p.name for p in runtime)}); got {len(args)}")
    signature = {}
    for param, arg in zip(runtime, args):
        annotated = param.annotation_type
        is_tensor = hasattr(arg, "data_ptr")
        signature[param.name] = annotated if annotated and not is_tensor else triton_type(arg)
    return KernelCall(kernel_name(kernel), signature, full_constexprs(kernel, constexprs), num_warps, num_stages,
                      aligned=aligned_args(runtime, args), divisible=divisible_args(kernel, args))


def aligned_args(params, args) -> tuple[str, ...]:
    """The tensor arguments whose first element sits at a multiple of 16 bytes in its allocation: the binary may
    assume those pointers 16-byte aligned (Triton's `tt.divisibility` 16). Allocations are aligned, so only a
    view's storage offset decides, and it is a model constant (a split of a merged projection at an odd
    column, e.g. MLA's k_pe beside the latent): the launches at run time see the same offsets, and the
    runtime checks each assumed pointer (rdnac.runtime.aot)."""
    return tuple(p.name for p, a in zip(params, args)
                 if hasattr(a, "data_ptr") and (a.storage_offset() * a.element_size()) % 16 == 0)


def common_alignment(calls: list[KernelCall]) -> list[KernelCall]:
    """`calls` with one alignment assumption per specialization key (the key leaves alignment out): the
    pointers aligned in every launch that uses that binary."""
    common: dict[str, set[str]] = {}
    for c in calls:
        common[c.key] = common[c.key] & set(c.aligned) if c.key in common else set(c.aligned)
    return [c if set(c.aligned) == common[c.key] else replace(c, aligned=tuple(a for a in c.aligned
                                                                                 if a in common[c.key]))
            for c in calls]


class RecordingLauncher:
    """Record the specializations a program needs, running nothing (works over meta tensors)."""

    def __init__(self, pdl: bool = False, early_meta: bool = False, early_weights: bool = False) -> None:
        self._calls: dict[str, KernelCall] = {}
        self.pdl = pdl  # record the PDL=True specializations (see `rdnac.kernels.launch.with_pdl`)
        self.early_meta = early_meta  # and with PDL, the EARLY_META=True ones
        self.early_weights = early_weights  # and the EARLY_WEIGHTS=True ones

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        call = record_call(kernel, tuple(args), with_pdl(kernel, constexprs, self.pdl, self.early_meta,
                                                         self.early_weights),
                           num_warps, num_stages)
        if call.key in self._calls:  # the same binary: assume only what every launch of it gives
            call = common_alignment([self._calls[call.key], call])[0]
        self._calls[call.key] = call

    @property
    def calls(self) -> list[KernelCall]:
        """The distinct specializations, in first-launch order."""
        return list(self._calls.values())
