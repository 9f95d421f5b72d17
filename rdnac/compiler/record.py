"""Record which kernel specializations a program needs, running nothing (over meta tensors).

Kernel selection and `rdnac tune` run the kernel wrappers with a recording
launcher: every launch becomes a `KernelCall` (rdnac.plans.binaries) naming
the kernel, its argument types, every constexpr, warps, stages and the
divisibility of its shape ints, which `rdnac.compiler.build` then compiles.
The runtime's `AotLauncher` derives the same key from the same launch, so a
recorded launch always finds its binary.
"""

from __future__ import annotations

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
                      divisible=divisible_args(kernel, args))


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
        self._calls.setdefault(call.key, call)

    @property
    def calls(self) -> list[KernelCall]:
        """The distinct specializations, in first-launch order."""
        return list(self._calls.values())
