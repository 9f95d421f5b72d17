"""Launchers: how a kernel wrapper's launch reaches a GPU, the interpreter or a recorder.

The JIT and interpreter launchers live here; the plan's `AotLauncher` in
`rdnac.runtime.aot`; the compiler's `RecordingLauncher` in
`rdnac.compiler.record`. The helpers below (kernel names, argument types,
constexpr encoding, divisibility, PDL) are what the recorder and the AOT
launcher share, so a recorded launch and a run-time launch agree on the
specialization key (`rdnac.plans.binaries.spec_key`).

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

import importlib

import triton


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: `triton.cdiv` is a constexpr function, ~7 us a call from Python."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (>= 1), for host code (see `cdiv`)."""
    return 1 << max(0, int(n) - 1).bit_length()


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


def _patch_interpreter_scalar_index() -> None:
    """Work around a Triton interpreter bug under NumPy >= 2.4 (seen in Triton 3.6; 3.9 has the fix).

    The interpreter's scalars are one-element arrays, and 3.6 turns one into a Python int (a `range` bound
    such as the GEMMs' `range(k_begin, k_end, BLOCK_K)`) with `int(array)`, which NumPy 2.4 refuses for
    arrays of one dimension ("only 0-dimensional arrays can be converted to Python scalars"): every GEMM
    failed under `rdnac run --interpret` on the GPU machine. Re-set `__index__` with `.item()`, right after
    the interpreter's own patch, inside the same scope (so its restore undoes both)."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_rdnac_scalar_index", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._rdnac_scalar_index = True


class InterpretLauncher:
    """Run kernels under the Triton interpreter on CPU tensors (`rdnac run --interpret`, CI tests)."""

    def __init__(self) -> None:
        self._interpreted: dict[int, Any] = {}
        _patch_interpreter_bf16_dot()
        _patch_interpreter_scalar_index()

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        from triton.runtime.interpreter import InterpretedFunction

        fn = self._interpreted.get(id(kernel))
        if fn is None:
            fn = self._interpreted[id(kernel)] = InterpretedFunction(with_interpreted_helpers(kernel.fn))
        fn[grid](*args, **constexprs)


def with_interpreted_helpers(fn: Any) -> Any:
    """`fn` (a kernel's Python function) whose calls to rdnac's own `@triton.jit` helpers run them under
    the interpreter too: a JITFunction called from interpreted code raises "Cannot call @triton.jit'd
    outside of the scope of a kernel". The copy sees the module's globals with each helper it reads
    (and, recursively, theirs) replaced by the interpreter's rewrite of it.
    Triton's own jit functions stay as they are: the interpreter recognizes some by identity (the
    reduce combine functions)."""
    import types

    from triton.runtime.interpreter import InterpretedFunction

    if fn in _INTERPRETABLE:  # one copy per function: the interpreter caches its rewrite per function object
        return _INTERPRETABLE[fn]
    named = set(fn.__code__.co_names)  # the globals the function reads
    helpers = {name: value for name, value in fn.__globals__.items() if name in named
               and isinstance(value, triton.JITFunction) and value.fn.__module__.startswith("rdnac.")}
    if not helpers:
        _INTERPRETABLE[fn] = fn
        return fn
    scope = dict(fn.__globals__)
    for name, helper in helpers.items():
        # the interpreter's rewrite of the helper, called directly: InterpretedFunction's own __call__
        # re-patches triton.language on every call, and the kernel's launch has patched it for the grid.
        # (With both caches the FP8 fusion and GEMM test files run as fast as with copied code: 110 s
        # against 115; with neither, 131.)
        scope[name] = InterpretedFunction(with_interpreted_helpers(helper.fn)).rewrite()
    copy = _INTERPRETABLE[fn] = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return copy


_INTERPRETABLE: dict[Any, Any] = {}  # kernel or helper function -> its copy that interprets rdnac's helpers


# -- AOT: what identifies a launch's specialization -------------------------------------

# torch dtype name -> Triton's pointee type name (as in a `signature` "*bf16").
_TRITON_DTYPES = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5", "float8_e4m3fnuz": "fp8e4b8", "float8_e5m2fnuz": "fp8e5b16",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "u8", "uint16": "u16", "uint32": "u32", "uint64": "u64", "bool": "i1",
}
_DTYPE_PREFIX = "tl.dtype:"  # how a tl.dtype constexpr (e.g. OUT_DTYPE=tl.bfloat16) is stored


def kernel_name(kernel: triton.JITFunction) -> str:
    """"module:function", the name by which a plan (and a rebuild) finds a kernel in rdnac's library."""
    assert isinstance(kernel, triton.JITFunction), f"AOT launches need a plain @triton.jit kernel; got {kernel!r}"
    return f"{kernel.fn.__module__}:{kernel.fn.__qualname__}"


def resolve_kernel(name: str) -> triton.JITFunction:
    """The @triton.jit function called "module:function" in rdnac's kernel library. A plan names its
    kernels this way; only modules of the `rdnac.kernels` package resolve (`registry.kernel_module`),
    so a plan cannot make the loader import anything else."""
    from rdnac.kernels.registry import kernel_module

    from rdnac.errors import PlanError

    module_name, _, fn_name = name.partition(":")
    kernel = getattr(kernel_module(module_name), fn_name, None)
    if not isinstance(kernel, triton.JITFunction):  # a name from a plan file: a user error, not an invariant
        raise PlanError(f"a plan's kernel requires a @triton.jit kernel of rdnac's kernel library; got {name!r}, "
                        "which is none; do recompile the plan with this rdnac")
    return kernel


def triton_type(arg: Any) -> str:
    """The Triton signature type of one runtime argument, as the JIT would pick it."""
    if hasattr(arg, "dtype") and hasattr(arg, "data_ptr"):  # a torch tensor, meta tensors included
        name = str(arg.dtype).removeprefix("torch.")
        assert name in _TRITON_DTYPES, f"no Triton pointer type for tensor dtype {arg.dtype}"
        return "*" + _TRITON_DTYPES[name]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        if -(2**31) <= arg < 2**31:
            return "i32"
        return "i64" if -(2**63) <= arg < 2**63 else "u64"
    if isinstance(arg, float):
        return "fp32"
    raise AssertionError(f"unsupported runtime kernel argument {arg!r} (pass tensors, ints, floats or bools)")


def encode_constexpr(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return _DTYPE_PREFIX + value.name
    assert value is None or isinstance(value, (bool, int, float, str)), f"unsupported constexpr value {value!r}"
    return value


def decode_constexpr(value: Any) -> Any:
    import triton.language as tl

    if isinstance(value, str) and value.startswith(_DTYPE_PREFIX):
        return tl.dtype(value[len(_DTYPE_PREFIX):])
    return value


def aligned(t: "torch.Tensor") -> "torch.Tensor":
    """`t`, or a fresh copy when its first element is not 16-byte aligned in its allocation (a column view
    that a split cut at an odd offset, e.g. the small gate projections of a merged linear). AOT binaries
    assume every pointer aligned (rdnac.plans.binaries); the offset is a model constant, so the compiler's
    recording and every run take the same branch. A fresh copy, not `.contiguous()`: a one-row slice (decode
    at batch 1) is contiguous already, and `.contiguous()` would hand back the same misaligned view."""
    if (t.storage_offset() * t.element_size()) % 16 == 0:
        return t
    return t.clone() if t.is_contiguous() else t.contiguous()


def divisible_args(kernel: triton.JITFunction, args: tuple[Any, ...]) -> tuple[str, ...]:
    """Which of the kernel's shape ints are divisible by 16 in this launch.

    A kernel module may declare `AOT_DIVISIBLE = {"kernel_fn": ("N", "K", "stride_xm")}`:
    integer args fixed by the model's shapes (never token counts). Binaries
    are specialized on their divisibility, as Triton's JIT would, so loads
    vectorize; the recorder and the AOT launcher both derive it from the
    actual values, so a launch always finds the binary built for it."""
    positions = _DIVISIBLE_POSITIONS.get(id(kernel))
    if positions is None:  # once per kernel: this runs on every launch
        declared = getattr(importlib.import_module(kernel.fn.__module__), "AOT_DIVISIBLE", {}).get(
            kernel.fn.__name__, ())
        runtime = [p.name for p in kernel.params if not p.is_constexpr]
        positions = _DIVISIBLE_POSITIONS[id(kernel)] = tuple((i, n) for i, n in enumerate(runtime) if n in declared)
    return tuple(name for i, name in positions
                 if isinstance(args[i], int) and not isinstance(args[i], bool) and args[i] % 16 == 0)


_DIVISIBLE_POSITIONS: dict[int, tuple[tuple[int, str], ...]] = {}  # id(kernel) -> declared (index, name)


def with_pdl(kernel: triton.JITFunction, constexprs: dict[str, Any], pdl: bool,
             early_meta: bool = False, early_weights: bool = False) -> dict[str, Any]:
    """`constexprs` plus PDL=True when `pdl` is on and the kernel takes a `PDL` constexpr, and
    EARLY_META=True when `early_meta` is also on and the kernel takes that constexpr (it then reads
    step inputs no kernel writes before `griddepcontrol.wait`: see `attention.py`), EARLY_WEIGHTS=True
    likewise with `early_weights` (a GEMM loads its first weight tile before the wait: see `gemm_fp8.py`).

    Programmatic dependent launch (NVIDIA sm90+): a kernel built with PDL=True
    starts with `griddepcontrol.launch_dependents; griddepcontrol.wait`, so the
    next kernel's blocks are scheduled while this one drains and wait, on the
    GPU, for it to complete: the launch gap between dependent kernels goes,
    the order of memory effects stays. Wrappers never pass PDL; the plan's
    recorder and its launcher add it, so one wrapper serves every target."""
    if not pdl or "PDL" in constexprs:
        return constexprs
    has = _HAS_PDL.get(id(kernel))
    if has is None:
        names = {p.name for p in kernel.params if p.is_constexpr}
        has = _HAS_PDL[id(kernel)] = ("PDL" in names, "EARLY_META" in names, "EARLY_WEIGHTS" in names)
    if not has[0]:
        return constexprs
    return {**constexprs, "PDL": True, **({"EARLY_META": True} if early_meta and has[1] else {}),
            **({"EARLY_WEIGHTS": True} if early_weights and has[2] else {})}


_HAS_PDL: dict[int, tuple[bool, bool, bool]] = {}  # id(kernel) -> whether it takes PDL, EARLY_META, EARLY_WEIGHTS


def full_constexprs(kernel: triton.JITFunction, constexprs: dict[str, Any]) -> dict[str, Any]:
    """Every constexpr of `kernel`, defaults filled in, values encoded (so keys match across launches)."""
    import inspect

    names = [p.name for p in kernel.params if p.is_constexpr]
    unknown = set(constexprs) - set(names)
    assert not unknown, f"{kernel_name(kernel)} has no constexpr {sorted(unknown)}; it has {names}"
    out = {}
    for p in kernel.params:
        if not p.is_constexpr:
            continue
        if p.name in constexprs:
            out[p.name] = encode_constexpr(constexprs[p.name])
        else:
            assert p.default is not inspect.Parameter.empty, f"{kernel_name(kernel)}: constexpr {p.name} not given"
            out[p.name] = encode_constexpr(p.default)
    return out


