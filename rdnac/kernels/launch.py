"""Launchers: how a kernel wrapper's launch reaches a GPU, the interpreter or a recorder.

A wrapper never calls `kernel[grid](...)` itself; it calls
`launcher.launch(kernel, grid, args, constexprs=..., num_warps=..., num_stages=...)`
with every runtime argument positional (tensors and ints, in the kernel's
parameter order, constexprs excluded) and every constexpr by name. Wrappers
must not read tensor values on the host (no `.item()`, `.tolist()`), so the
same call can be recorded over meta tensors and captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import triton


class Launcher(Protocol):
    def launch(self, kernel: triton.JITFunction, grid: tuple[int, ...], args: tuple[Any, ...], *,
               constexprs: dict[str, Any], num_warps: int = 4, num_stages: int = 2) -> None: ...


@dataclass
class JitLauncher:
    """Compile on first use with Triton's JIT (development and tuning only; plans never do this)."""

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def _patch_interpreter_bf16_dot() -> None:
    """Work around a Triton interpreter bug (seen in 3.6 and 3.9).

    The interpreter stores bf16 as raw uint16 and its `create_dot` multiplies
    those integers, so any `tl.dot` on bf16 operands returns garbage. Upcast
    bf16 operands to float32 first. Remove once Triton fixes `create_dot`.
    It lives here, not only in tests, because `rdnac run --interpret` runs
    bf16 plans under the interpreter too."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_rdnac_bf16_dot", False):
        return
    original = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def upcast(h):
            if h.dtype.scalar == tl.bfloat16:
                bits = h.data.astype(np.uint32) << np.uint32(16)
                return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
            return h
        return original(self, upcast(a), upcast(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    builder_cls._rdnac_bf16_dot = True


class InterpretLauncher:
    """Run kernels under the Triton interpreter on CPU tensors (`rdnac run --interpret`, CI tests)."""

    def __init__(self) -> None:
        self._interpreted: dict[int, Any] = {}
        _patch_interpreter_bf16_dot()

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        from triton.runtime.interpreter import InterpretedFunction

        fn = self._interpreted.get(id(kernel))
        if fn is None:
            fn = self._interpreted[id(kernel)] = InterpretedFunction(kernel.fn)
        fn[grid](*args, **constexprs)
