"""AOT binaries launched through `AotLauncher`: built with `rdnac.compiler.build`, run with no compiler.

The `gpu` tests run on the device machine (an NVIDIA H100/H200: the sm90
target); the runtime-import test runs everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import triton

from rdnac.errors import PlanError, TargetError
from rdnac.kernels import testing_kernels as tk
from rdnac.compiler.record import RecordingLauncher

ADD_BLOCK = 256
MM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}


def add(x, y, *, launcher):
    """out = x + y over flat tensors, through any launcher."""
    out = torch.empty_like(x)
    n = x.numel()
    launcher.launch(tk.add_kernel, (triton.cdiv(n, ADD_BLOCK),), (x, y, out, n), constexprs={"BLOCK": ADD_BLOCK},
                    num_warps=4, num_stages=1)
    return out


def matmul(a, b, *, launcher):
    """c = a @ b for row-major bf16 a [M, K], b [K, N], through any launcher."""
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(M, MM["BLOCK_M"]), triton.cdiv(N, MM["BLOCK_N"]))
    launcher.launch(tk.matmul_kernel, grid, (a, b, c, M, N, K, a.stride(0), b.stride(0), c.stride(0)),
                    constexprs=MM, num_warps=4, num_stages=2)
    return c


def _program(launcher, device):
    """Every launch the test program makes (shapes do not matter to the binaries: ints are not specialized)."""
    x = torch.empty(1823, device=device)  # [n] fp32
    add(x, x, launcher=launcher)
    a = torch.empty(181, 96, dtype=torch.bfloat16, device=device)  # [M, K]
    b = torch.empty(96, 79, dtype=torch.bfloat16, device=device)  # [K, N]
    matmul(a, b, launcher=launcher)


def _build(target: str, cache_dir) -> list[dict]:
    from rdnac.compiler.build import compile_calls

    rec = RecordingLauncher()
    _program(rec, "meta")
    return [b.to_dict() for b in compile_calls(rec.calls, target, quiet=True, cache_dir=cache_dir)]


def test_runtime_imports_nothing_from_the_compiler():
    code = ("import sys, rdnac.runtime.aot; "
            "bad = [m for m in sys.modules if m.startswith('rdnac.compiler')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_launch_assumptions_are_checked_against_the_arguments():
    from types import SimpleNamespace

    from rdnac.runtime.aot import AotLauncher, _Loaded

    loaded = _Loaded(binary=SimpleNamespace(kernel="m:k"), kernel=None,
                     aligned=[(0, "x_ptr")], divisible=[(1, "K")])
    check = AotLauncher.__new__(AotLauncher)._check_assumptions
    x = torch.zeros(64)  # fresh allocations are 16-byte aligned (torch aligns to 64)
    check(loaded, (x, 32))
    with pytest.raises(PlanError, match="m:k requires argument x_ptr 16-byte aligned"):
        check(loaded, (x[1:], 32))
    with pytest.raises(PlanError, match="m:k requires argument K divisible by 16.*got 33"):
        check(loaded, (x, 33))


@pytest.fixture(scope="module")
def device_target() -> str:
    from rdnac.runtime.aot import device_arch
    from rdnac.targets import TARGETS

    arch, gpu = device_arch(0)
    if arch not in TARGETS:
        pytest.skip(f"no rdnac target for this GPU ({gpu}, {arch})")
    return arch


@pytest.fixture(scope="module")
def binaries(device_target, tmp_path_factory) -> list[dict]:
    return _build(device_target, tmp_path_factory.mktemp("rdnac-cache"))


def _assert_close(out, ref, atol, rtol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    err = (out.float() - ref.float()).abs().max().item()
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g}"


@pytest.mark.gpu
def test_aot_launch_matches_torch_without_compiling(binaries, no_compiler):
    from rdnac.runtime.aot import AotLauncher

    launcher = AotLauncher(binaries, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (1823, 1, 4096):  # n = 1 would be a separate JIT specialization; one binary serves all
        x = torch.randn(n, device="cuda", generator=g)
        y = torch.randn(n, device="cuda", generator=g)
        _assert_close(add(x, y, launcher=launcher), x + y, 0, 0, f"add n={n}")
    for M, N, K in ((181, 79, 96), (1, 256, 1000), (1823, 781, 64)):
        a = torch.randn(M, K, device="cuda", generator=g).bfloat16()  # [M, K]
        b = (torch.randn(K, N, device="cuda", generator=g) / K**0.5).bfloat16()  # [K, N]
        ref = (a.float() @ b.float()).bfloat16()
        _assert_close(matmul(a, b, launcher=launcher), ref, 2e-2, 1e-2, f"matmul {M}x{N}x{K}")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_aot_launch_checks_alignment_and_missing_specializations(binaries, no_compiler):
    from rdnac.runtime.aot import AotLauncher

    launcher = AotLauncher(binaries, "cuda")
    x = torch.zeros(1025, device="cuda")
    with pytest.raises(PlanError, match=r"add_kernel requires argument x_ptr 16-byte aligned"):
        add(x[1:], x[1:], launcher=launcher)
    with pytest.raises(PlanError, match=r"add_kernel requires a precompiled binary for specialization .*\*fp16"):
        add(x.half(), x.half(), launcher=launcher)


@pytest.mark.gpu
def test_corrupted_binary_is_a_plan_error(binaries, no_compiler):
    from rdnac.runtime.aot import AotLauncher

    bad = dict(binaries[1], binary=bytes([binaries[1]["binary"][0] ^ 1]) + binaries[1]["binary"][1:])
    with pytest.raises(PlanError, match="matmul_kernel.*sha256"):
        AotLauncher([binaries[0], bad], "cuda")


@pytest.mark.gpu
def test_plan_for_another_gpu_is_a_target_error(device_target, tmp_path):
    from rdnac.runtime.aot import AotLauncher

    other = "gfx1201" if device_target.startswith("sm") else "sm90"
    foreign = _build(other, tmp_path)
    with pytest.raises(TargetError, match=f"{other}.*{device_target}"):
        AotLauncher(foreign, "cuda")


@pytest.mark.gpu
def test_binary_from_another_triton_is_rebuilt_with_a_warning(binaries):
    from rdnac.runtime.aot import AotLauncher

    stale = [dict(b, triton_version="0.0.0") for b in binaries]
    with pytest.raises(PlanError, match="built by Triton 0.0.0"):
        AotLauncher(stale, "cuda", allow_rebuild=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        launcher = AotLauncher(stale, "cuda")
    rebuild_warnings = [w for w in caught if "rebuilt them" in str(w.message)]
    assert len(launcher.rebuilt) == 2 and len(rebuild_warnings) == 1  # one warning per plan, not per kernel
    assert "2 kernel(s)" in str(rebuild_warnings[0].message) and "Triton 0.0.0" in str(rebuild_warnings[0].message)
    x = torch.arange(100, dtype=torch.float32, device="cuda")
    _assert_close(add(x, x, launcher=launcher), 2 * x, 0, 0, "add after rebuild")
