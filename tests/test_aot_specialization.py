"""AOT binaries specialize on the divisibility of their model-shape ints, as Triton's JIT would.

A stride left out of a module's `AOT_DIVISIBLE` costs vectorized loads: the paged attention kernels
had none, and on an H100 the plan's prefill attention ran 2x slower than the same kernel under the
JIT (497 vs 233 us at 2048 tokens, BENCHMARKS.md). Every row stride of every library kernel is
declared, except those listed here with the reason they are not."""

import importlib
import pkgutil

import pytest
import torch
import triton
import triton.language as tl

import rdnac.kernels
from rdnac.kernels import attention, attention_decode
from rdnac.compiler.record import RecordingLauncher

# stride -> why the binaries do not assume it divisible by 16
NOT_DECLARED = {
    "stride_bt": "block-table width = max_model_len / block size, a runtime choice; read one id at a time",
    "stride_sm": "scale rows: one float per row or group, never a vector load",
    "stride_as": "activation scales: 0 (broadcast), 1 or the group count; scalar loads",
    "stride_ws": "weight scales: 0 (per tensor) or 1 (per channel); scalar loads",
    "stride_asm": "activation scale rows (groups per token); scalar loads",
    "stride_ask": "activation scale columns: 0 or 1",
    "stride_wsn": "weight scale rows (blocks along K); scalar loads",
    "stride_wsk": "weight scale columns: 0 or 1",
}


def _library_kernels():
    for info in pkgutil.iter_modules(rdnac.kernels.__path__):
        if info.name == "testing_kernels":  # test fixtures, never in a plan
            continue
        module = importlib.import_module(f"rdnac.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and obj.__module__ == module.__name__:
                yield module, name, obj


def test_every_row_stride_is_declared_divisible():
    undeclared = []
    for module, name, kernel in _library_kernels():
        declared = getattr(module, "AOT_DIVISIBLE", {}).get(name, ())
        for p in kernel.params:
            if p.name.startswith("stride") and not p.is_constexpr and p.name not in declared \
                    and p.name not in NOT_DECLARED:
                undeclared.append(f"{module.__name__}.{name}: {p.name}")
    assert not undeclared, "strides binaries cannot assume divisible by 16: " + ", ".join(undeclared)


def test_declared_names_are_parameters():
    for module, name, kernel in _library_kernels():
        params = {p.name for p in kernel.params if not p.is_constexpr}
        extra = set(getattr(module, "AOT_DIVISIBLE", {}).get(name, ())) - params
        assert not extra, f"{module.__name__}.{name} declares unknown args {sorted(extra)}"


def test_jit_helpers_take_no_string_defaults():
    """A jit helper called without a string constexpr it defaults builds under Triton 3.9 but not 3.6
    (the GPU machine's): the default reaches `tl.load(cache_modifier=...)` as a plain str. The split-K
    reduce kernels failed so on the H100 in session 14 ("'str' object has no attribute 'type'"). Kernels
    (`*_kernel`) are safe: a KernelCall passes every constexpr."""
    import inspect

    found = [f"{module.__name__}.{name}({p.name}={p.default!r})"
             for module, name, fn in _library_kernels() if not name.endswith("_kernel")
             for p in inspect.signature(fn.fn).parameters.values() if isinstance(p.default, str)]
    helpers = [name for _, name, _ in _library_kernels() if not name.endswith("_kernel")]
    assert "sum_splits" in helpers and "splitk_partials" in helpers  # the scan sees the helpers
    assert not found, "pass these explicitly instead of defaulting: " + ", ".join(found)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_attention_specializations_carry_their_strides(phase):
    """Qwen3-8B widths (32/8 heads x 128, q a slice of the merged qkv): the recorded call assumes
    every q/out/cache stride divisible by 16."""
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    T = 1 if phase == "decode" else 2048
    qkv = meta(T, (32 + 16) * 128)
    q = qkv[:, : 32 * 128]
    cache = meta(300, 16, 8, 128)
    args = (q, cache, cache, meta(T if phase == "decode" else 1, 256, dtype=torch.int32),
            meta(T if phase == "decode" else 1, dtype=torch.int32), meta(2, dtype=torch.int32),
            meta(T, dtype=torch.int64))
    kw = dict(num_heads=32, num_kv_heads=8, head_dim=128, scale=128 ** -0.5)
    rec = RecordingLauncher()
    if phase == "prefill":
        attention.attention_prefill(*args, **kw, max_query_len=T, launcher=rec,
                                    config=attention._config(8, 3, BLOCK_M=128, BLOCK_N=128))
    else:
        attention_decode.attention_decode(*args, **kw, launcher=rec,
                                          config=attention._config(4, 2, NUM_SPLITS=4, BLOCK_N=64))
    kernel_call = rec.calls[0]
    module = attention if phase == "prefill" else attention_decode  # each declares its kernels' strides
    assert set(module.AOT_DIVISIBLE[kernel_call.kernel.split(":")[1]]) <= set(kernel_call.divisible), kernel_call.key
    assert kernel_call.kernel.startswith(module.__name__ + ":"), kernel_call.kernel
    assert "stride_bt" not in kernel_call.divisible


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_recorded_alignment_follows_each_views_storage_offset():
    """A binary assumes a pointer 16-byte aligned only where every recorded launch of it passes an aligned view:
    a split of a merged projection at an odd column (MLA's k_pe on the H100, session 17) is not assumed, and
    the compiled binary carries no divisibility for it."""
    from rdnac.compiler.record import RecordingLauncher, common_alignment
    from rdnac.targets.compile import triton_attrs

    merged = torch.empty(4, 37, dtype=torch.bfloat16, device="meta")
    even, odd = merged[:, 8:16], merged[:, 5:13]  # 16 and 10 bytes into the allocation
    out = torch.empty(4, 8, dtype=torch.bfloat16, device="meta")
    rec = RecordingLauncher()
    rec.launch(_copy_kernel, (1,), (even, out, 8), constexprs={"BLOCK": 8})
    assert rec.calls[0].aligned == ("x_ptr", "y_ptr")
    rec.launch(_copy_kernel, (1,), (odd, out, 8), constexprs={"BLOCK": 8})
    (call,) = rec.calls
    assert call.aligned == ("y_ptr",)
    assert triton_attrs(_copy_kernel, call) == {(1,): [["tt.divisibility", 16]]}
    first = RecordingLauncher()
    first.launch(_copy_kernel, (1,), (even, out, 8), constexprs={"BLOCK": 8})
    assert [c.aligned for c in common_alignment(first.calls + [call])] == [("y_ptr",), ("y_ptr",)]
