"""Recording kernel specializations and AOT-building them for every GPU target (CPU only: cross-compiles)."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch
import triton

from rdnac.compiler.build import BuildError, check_resources, compile_calls
from rdnac.compiler.record import RecordingLauncher
from rdnac.kernels import testing_kernels as tk
from rdnac.plans.binaries import KernelBinary, KernelCall, sha256_hex

BUILD_TARGETS = ["gfx1201", "gfx1151", "gfx942", "gfx950", "sm90"]
MATRIX_PREFIX = {"gfx1201": "v_wmma_", "gfx1151": "v_wmma_", "gfx942": "v_mfma_", "gfx950": "v_mfma_", "sm90": "wgmma."}


def _record(block_mnk=(64, 64, 32), num_warps=4, num_stages=2) -> list[KernelCall]:
    """The calls a small program makes, recorded over meta tensors (nothing runs)."""
    rec = RecordingLauncher()
    x = torch.empty(1823, device="meta")  # [n] fp32
    for n in (1823, 1, 7):  # token counts vary: one specialization
        rec.launch(tk.add_kernel, (8,), (x, x, x, n), constexprs={"BLOCK": 256}, num_warps=4, num_stages=1)
    a = torch.empty(181, 96, dtype=torch.bfloat16, device="meta")  # [M, K]
    b = torch.empty(96, 79, dtype=torch.bfloat16, device="meta")  # [K, N]
    c = torch.empty(181, 79, dtype=torch.bfloat16, device="meta")  # [M, N]
    bm, bn, bk = block_mnk
    rec.launch(tk.matmul_kernel, (3, 2), (a, b, c, 181, 79, 96, a.stride(0), b.stride(0), c.stride(0)),
               constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=num_warps, num_stages=num_stages)
    return rec.calls


def test_recorder_deduplicates_and_types_arguments():
    calls = _record()
    assert [c.kernel for c in calls] == ["rdnac.kernels.testing_kernels:add_kernel",
                                         "rdnac.kernels.testing_kernels:matmul_kernel"]
    add, mm = calls
    assert add.signature == {"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"}
    assert add.aligned == ("x_ptr", "y_ptr", "out_ptr") and add.divisible == ()
    assert mm.signature["a_ptr"] == "*bf16" and mm.constexprs == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    assert (add.num_warps, add.num_stages) == (4, 1)
    big = RecordingLauncher()
    x = torch.empty(4, device="meta")
    big.launch(tk.add_kernel, (1,), (x, x, x, 2**33), constexprs={"BLOCK": 256})
    assert big.calls[0].signature["n"] == "i64"


def test_kernel_call_round_trips_through_msgpack():
    for call in _record():
        again = KernelCall.from_dict(msgpack.unpackb(msgpack.packb(call.to_dict()), raw=False))
        assert again == call and again.key == call.key and hash(again) == hash(call)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("rdnac-cache")


@pytest.fixture(scope="module")
def built(cache) -> dict[str, list[KernelBinary]]:
    return {t: compile_calls(_record(), t, quiet=True, cache_dir=cache) for t in BUILD_TARGETS}


@pytest.mark.parametrize("target", BUILD_TARGETS)
def test_build_reads_resources(built, target):
    add, mm = built[target]
    assert add.binary_ext == mm.binary_ext == ("cubin" if target == "sm90" else "hsaco")
    assert mm.binary[:4] == b"\x7fELF" and sha256_hex(mm.binary) == mm.sha256
    assert mm.resources.shared_bytes > 0 and mm.resources.num_spills == 0 and mm.resources.num_regs > 0
    assert any(i.startswith(MATRIX_PREFIX[target]) for i in mm.resources.matrix_instructions), mm.resources
    assert add.resources.matrix_instructions == () and add.resources.num_spills == 0
    assert mm.metadata["name"] == "matmul_kernel" and mm.metadata["shared"] == mm.resources.shared_bytes
    assert check_resources(mm, target) == [] and check_resources(add, target) == []
    again = KernelBinary.from_dict(msgpack.unpackb(msgpack.packb(mm.to_dict()), raw=False))
    assert again == mm


def test_cache_hit_is_fast(built, cache):
    start = time.perf_counter()
    again = compile_calls(_record(), "gfx942", cache_dir=cache)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"cache hit took {elapsed:.2f} s"
    assert [b.sha256 for b in again] == [b.sha256 for b in built["gfx942"]]


def test_corrupt_cache_entry_is_rebuilt(built, cache):
    from rdnac.compiler.build import cache_key
    from rdnac.targets import get_target

    call = _record()[0]
    (cache / "kernels" / cache_key(call, get_target("sm90"))).write_bytes(b"not msgpack")
    (binary,) = compile_calls([call], "sm90", quiet=True, cache_dir=cache)
    assert binary.sha256 == built["sm90"][0].sha256


def test_check_resources_rejects_lds_over_budget(cache):
    # 32x128 tile, BLOCK_K 128, 3 stages: two buffers of bf16 A and B tiles = 80 KiB > gfx1201's 64 KiB.
    calls = _record(block_mnk=(32, 128, 128), num_warps=8, num_stages=3)
    (_, mm) = compile_calls(calls, "gfx1201", quiet=True, cache_dir=cache)
    assert mm.resources.shared_bytes == 80 * 1024
    problems = check_resources(mm, "gfx1201")
    assert any("needs 81920 bytes of LDS" in p and "allows 65536" in p for p in problems), problems
    assert "built for gfx1201, not gfx950" in check_resources(mm, "gfx950")[0]


def test_build_error_names_the_kernel(cache):
    a = torch.empty(64, 64, dtype=torch.float8_e4m3fnuz, device="meta")
    rec = RecordingLauncher()
    rec.launch(tk.matmul_kernel, (1, 1), (a, a, a, 64, 64, 64, 64, 64, 64),
               constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64})
    with pytest.raises(BuildError, match=r"matmul_kernel\(\*fp8e4b8.*fp8e4b8 not supported") as excinfo:
        compile_calls(rec.calls, "sm90", quiet=True, cache_dir=cache)
    assert excinfo.value.kernels == ["rdnac.kernels.testing_kernels:matmul_kernel"]
    assert f"for sm90 under Triton {triton.__version__} " in str(excinfo.value)
    assert "CompilationError at `" in str(excinfo.value)  # the kernel source line Triton stopped on


def test_cpu_target_has_no_binaries(cache):
    with pytest.raises(BuildError, match="GPU target"):
        compile_calls(_record(), "cpu", cache_dir=cache)
