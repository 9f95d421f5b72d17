"""GEMM family (`linear`, `logits`) against the IR references, under the Triton interpreter.

Weights are scaled by 1/sqrt(K) so outputs are O(1): fp32 then checks at
atol = rtol = 1e-4, and bf16 (reference computed in fp32 from the same bf16
inputs; the only error left is rounding the output to bf16) at atol 2e-2,
rtol 1e-2, which is the brief's "2e-2 scaled by sqrt(K)" for unscaled weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

from rdnac.ir import ops
from rdnac.kernels import gemm
from rdnac.kernels.launch import InterpretLauncher, JitLauncher

SHAPES = [(1536, 576), (576, 1536), (192, 576), (1823, 781)]  # (N, K)
TOKENS = [1, 7, 33]
DTYPES = [torch.float32, torch.bfloat16]
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 1e-2)}  # (atol, rtol)

INTERPRET = InterpretLauncher()


def _problem(M: int, N: int, K: int, dtype: torch.dtype, has_bias: bool = False) -> dict:
    return {"M": gemm.m_bucket(M), "N": N, "K": K, "dtype": str(dtype).removeprefix("torch."), "has_bias": has_bias}


def _operands(M, N, K, dtype, has_bias, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)  # [M, K]
    w = torch.randn(N, K, generator=g) / math.sqrt(K)  # [N, K]
    bias = torch.randn(N, generator=g) if has_bias else None  # [N]
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(w), cast(bias)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, atol: float, rtol: float, what: str):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    err = (out.float() - ref.float()).abs().max().item()
    assert torch.allclose(out.float(), ref.float(), atol=atol, rtol=rtol), \
        f"{what}: max abs error {err:.3g} (atol {atol}, rtol {rtol})"


def _check_linear(M, N, K, dtype, has_bias, config, launcher, device="cpu"):
    x, w, bias = _operands(M, N, K, dtype, has_bias, device)
    out = gemm.linear(x, w, bias, config=config, launcher=launcher)
    ref = ops.linear(x.float(), w.float(), None if bias is None else bias.float())  # fp32 from the same inputs
    _assert_close(out, ref, dtype, *TOLERANCES[dtype], what=f"linear M={M} N={N} K={K} {dtype} {config}")


def _check_logits(T, R, V, H, dtype, softcap, config, launcher, device="cpu"):
    x, w, _ = _operands(T, V, H, dtype, False, device)
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(0, T, (R,), generator=g).to(device)  # [R], unsorted, may repeat
    out = gemm.logits(x, indices, w, softcap=softcap, config=config, launcher=launcher)
    # The kernel keeps the fp32 accumulator, so it matches an fp32 reference tightly...
    ref32 = ops.logits(x.float(), indices, w.float(), softcap=softcap)
    what = f"logits T={T} R={R} V={V} H={H} {dtype} softcap={softcap} {config}"
    _assert_close(out, ref32, torch.float32, 1e-4, 1e-4, what + " vs fp32 reference")
    # ...and the IR reference (which rounds bf16 logits before .float()) within bf16 rounding.
    _assert_close(out, ops.logits(x, indices, w, softcap=softcap), torch.float32, *TOLERANCES[dtype], what=what)


# ---------------------------------------------------------------- configs


def test_m_bucket():
    assert [gemm.m_bucket(m) for m in (1, 2, 3, 5, 16, 17, 64, 65, 256, 257, 8192)] == \
        [1, 2, 4, 8, 16, 32, 64, 128, 256, gemm.LARGE_M, gemm.LARGE_M]


@pytest.mark.parametrize("M", [1, 4, 16, 32, 64, 128, 256, 2048])
@pytest.mark.parametrize("N,K", SHAPES + [(49152, 576), (576, 4608), (4096, 4096)])
def test_config_space_is_sound(M, N, K):
    problem = _problem(M, N, K, torch.bfloat16)
    space = gemm.config_space(problem)
    assert 1 <= len(space) <= 24
    assert gemm.default_config(problem) in space
    for config in space:
        c = config["constexprs"]
        assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16, config  # tl.dot minimum
        if M <= gemm.DECODE_MAX_M:
            assert c["BLOCK_M"] == 16 and c["GROUP_SIZE_M"] == 1, config
        # Every split gets K to reduce: none is empty, none is truncated.
        k_per_split = triton.cdiv(triton.cdiv(K, c["SPLIT_K"]), c["BLOCK_K"]) * c["BLOCK_K"]
        assert triton.cdiv(K, k_per_split) == c["SPLIT_K"], config


def test_decode_splits_k_when_few_tiles():
    # 576 outputs are 9 tiles of 64: split-K must add programs; 49152 outputs need none.
    assert gemm.default_config(_problem(1, 576, 4608, torch.bfloat16))["constexprs"]["SPLIT_K"] > 1
    assert gemm.default_config(_problem(1, 49152, 576, torch.bfloat16))["constexprs"]["SPLIT_K"] == 1


class _Recorder:
    """Records launches without running them: proves the wrappers never read tensor values."""

    def __init__(self):
        self.launches = []

    def launch(self, kernel, grid, args, *, constexprs, num_warps=4, num_stages=2):
        self.launches.append((kernel.fn.__name__, grid, constexprs))


def test_wrappers_run_on_meta_tensors():
    x = torch.empty(7, 4608, dtype=torch.bfloat16, device="meta")
    w = torch.empty(576, 4608, dtype=torch.bfloat16, device="meta")
    bias = torch.empty(576, dtype=torch.bfloat16, device="meta")
    config = gemm.default_config(_problem(7, 576, 4608, torch.bfloat16, True))
    recorder = _Recorder()
    out = gemm.linear(x, w, bias, config=config, launcher=recorder)
    assert out.shape == (7, 576) and out.dtype == torch.bfloat16 and out.is_meta
    split_k = config["constexprs"]["SPLIT_K"]
    assert split_k > 1 and [name for name, _, _ in recorder.launches] == ["_gemm_kernel", "_splitk_reduce_kernel"]
    assert recorder.launches[0][1] == (9, split_k)  # 1 row tile x 9 column tiles, per split
    assert recorder.launches[1][2]["HAS_BIAS"] and not recorder.launches[0][2]["HAS_BIAS"]  # bias added once

    indices = torch.empty(3, dtype=torch.int64, device="meta")
    out = gemm.logits(x, indices, w, softcap=30.0, config=config, launcher=_Recorder())
    assert out.shape == (3, 576) and out.dtype == torch.float32


# ---------------------------------------------------------------- interpreter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", TOKENS)
def test_linear_default_config(M, N, K, has_bias, dtype):
    config = gemm.default_config(_problem(M, N, K, dtype, has_bias))
    _check_linear(M, N, K, dtype, has_bias, config, INTERPRET)


def test_linear_every_decode_candidate():
    M, N, K = 7, 1823, 781
    for config in gemm.config_space(_problem(M, N, K, torch.bfloat16, True)):
        _check_linear(M, N, K, torch.bfloat16, True, config, INTERPRET)


@pytest.mark.parametrize("M", [200, 300])
def test_linear_every_prefill_candidate(M):
    # The M > 64 buckets (row tiles of 64 and 128, grouped order), on a narrow N to stay affordable.
    N, K = 192, 576
    for config in gemm.config_space(_problem(M, N, K, torch.bfloat16, True)):
        _check_linear(M, N, K, torch.bfloat16, True, config, INTERPRET)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_logits(dtype, softcap):
    T, R, V, H = 9, 3, 4099, 576
    _check_logits(T, R, V, H, dtype, softcap, gemm.default_config(_problem(R, V, H, dtype)), INTERPRET)


def test_logits_split_k_softcap():
    # The softcap moves to the reduce kernel when K is split.
    T, R, V, H = 9, 3, 4099, 576
    config = next(c for c in gemm.config_space(_problem(R, V, H, torch.bfloat16)) if c["constexprs"]["SPLIT_K"] > 1)
    _check_logits(T, R, V, H, torch.bfloat16, 30.0, config, INTERPRET)


def test_logits_full_vocab():
    # One row over a 49152 vocab; the widest tile keeps the interpreter affordable.
    T, R, V, H = 5, 1, 49152, 576
    space = gemm.config_space(_problem(R, V, H, torch.bfloat16))
    config = max(space, key=lambda c: c["constexprs"]["BLOCK_N"] * c["constexprs"]["BLOCK_K"] / c["constexprs"]["SPLIT_K"])
    _check_logits(T, R, V, H, torch.bfloat16, 30.0, config, INTERPRET)


def _self_reducing(config: dict) -> dict:
    return {**config, "constexprs": {**config["constexprs"], "SELF_REDUCE": True}}


def _split_configs(M, N, K):
    return [c for c in gemm.config_space(_problem(M, N, K, torch.bfloat16)) if c["constexprs"]["SPLIT_K"] > 1]


@pytest.mark.parametrize("M,has_bias", [(1, False), (5, True), (16, True)])
def test_self_reduce_is_bit_identical_to_the_reduce_kernel(M, has_bias):
    """SELF_REDUCE sums the partials in the reduce kernel's order: the same bits, no second launch,
    and every arrival counter back at 0 (the next launch, or a graph replay, starts clean)."""
    N, K = 640, 2048  # 1.3M weights: the decode space splits K
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(N, generator=g).to(torch.bfloat16) if has_bias else None
    configs = _split_configs(M, N, K)
    assert configs, "the decode space should split K for this shape"
    for config in configs:
        two_kernels = gemm.linear(x, w, bias, config=config, launcher=INTERPRET)
        for _ in range(2):  # twice: the counters must reset
            one = gemm.linear(x, w, bias, config=_self_reducing(config), launcher=INTERPRET)
            assert torch.equal(one, two_kernels), f"{config}: differs from the two-kernel result"
        assert not gemm.split_k_counters(x.device, 1).any(), "arrival counters left non-zero"


def test_self_reduce_logits_softcap():
    T, R, V, H = 9, 3, 4099, 576
    config = next(c for c in gemm.config_space(_problem(R, V, H, torch.bfloat16)) if c["constexprs"]["SPLIT_K"] > 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w = torch.randn(V, H, generator=g).to(torch.bfloat16)
    idx = torch.tensor([8, 0, 4])
    two = gemm.logits(x, idx, w, softcap=30.0, config=config, launcher=INTERPRET)
    one = gemm.logits(x, idx, w, softcap=30.0, config=_self_reducing(config), launcher=INTERPRET)
    assert torch.equal(one, two)


def test_self_reduce_launches_one_kernel_and_compiles_for_every_gpu_target():
    from rdnac.compiler.build import check_resources, compile_calls
    from rdnac.compiler.record import RecordingLauncher

    meta = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731
    calls = []
    for config in _split_configs(1, 4096, 12288):
        rec = RecordingLauncher()
        gemm.linear(meta(1, 12288), meta(4096, 12288), config=_self_reducing(config), launcher=rec)
        assert [c.kernel.split(":")[1] for c in rec.calls] == ["_gemm_kernel"]
        calls += rec.calls
    # Every target builds them (a build error raises); on sm90, where `rdnac tune` offers them, none
    # spills. (On gfx1201 the widest BLOCK_K spills, as plan builds detect and skip for any config.)
    for target in ("sm90", "gfx942", "gfx1201"):
        binaries = compile_calls(calls, target, quiet=True)
        if target == "sm90":
            assert all(check_resources(b, target) == [] for b in binaries)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_gemm_gpu():
    launcher = JitLauncher()
    for M in TOKENS + [300]:
        for N, K in SHAPES:
            for has_bias in (False, True):
                problem = _problem(M, N, K, torch.bfloat16, has_bias)
                for config in gemm.config_space(problem):
                    _check_linear(M, N, K, torch.bfloat16, has_bias, config, launcher, device="cuda")
    for R in (1, 4):
        problem = _problem(R, 49152, 576, torch.bfloat16)
        for config in gemm.config_space(problem):
            _check_logits(8, R, 49152, 576, torch.bfloat16, 30.0, config, launcher, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_self_reduce_gpu_bit_identical_in_a_replayed_graph():
    """Decode shapes of an 8B model: SELF_REDUCE equals the two-kernel path bit for bit, eagerly and
    over 20 replays of a captured graph (a race between splits would show as a wrong sum)."""
    launcher = JitLauncher()
    for N, K in ((4096, 4096), (4096, 12288), (6144, 4096)):
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        w = (0.02 * torch.randn(N, K, device="cuda")).to(torch.bfloat16)
        for config in _split_configs(1, N, K):
            expected = gemm.linear(x, w, config=config, launcher=launcher)
            one = _self_reducing(config)
            assert torch.equal(gemm.linear(x, w, config=one, launcher=launcher), expected), config
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = gemm.linear(x, w, config=one, launcher=launcher)
            for _ in range(20):
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, expected), config
