"""The FP8 GEMV form of `linear_fp8` (config constexpr GEMV, `rdnac.kernels.gemv_fp8`) against the IR
reference and the family's dot kernels, under the Triton interpreter; its tune candidates; its config
errors; plans that select it, cross-compiled for sm90 and gfx1201; and (gpu) the Qwen3-8B shapes.

Tolerances are the dot kernels' (test_kernels_gemm_fp8.TOLERANCES): both are fp32 sums of the same
exact products, in different orders.
"""

from __future__ import annotations

import pytest
import torch

from rdnac.errors import RdnacError
from rdnac.ir import ops
from rdnac.kernels import gemm_fp8, gemv_fp8
from rdnac.kernels.gemm import split_k_counters
from rdnac.kernels.launch import JitLauncher, RecordingLauncher
from tests.test_kernels_gemm_fp8 import INTERPRET, MIXED, TOLERANCES, VARIANTS, _operands, _problem

N_ODD, K_ODD = 200, 600  # N not a multiple of BLOCK_N, K not a multiple of BLOCK_K (nor of the 128 scale block)


def _gemv(block_m: int, block_n: int, block_k: int, split_k: int, num_warps: int = 4, **flags) -> dict:
    config = gemm_fp8._config(block_m, block_n, block_k, 1, split_k, num_warps, 1)
    config["constexprs"].update(GEMV=True, **flags)
    return config


def _run(x, weight, weight_scale, rest, attrs, config, launcher=INTERPRET):
    return gemm_fp8.linear_fp8(x, weight, weight_scale, *rest, **attrs, config=config, launcher=launcher)


def _close(out, expected, what):
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype} != {expected.dtype}"
    atol, rtol = TOLERANCES[out.dtype]
    out, expected = out.cpu().float(), expected.cpu().float()
    err = (out - expected).abs().max().item()
    assert torch.allclose(out, expected, atol=atol, rtol=rtol), f"{what}: max abs error {err:.3g}"


@pytest.mark.parametrize("variant", list(VARIANTS) + list(MIXED))
def test_gemv_matches_reference_and_dot_kernel(variant):
    """M = 1, 2, 3, 4, 16 (BLOCK_M 1, 2, 4 and 4 over several row tiles); split-K 1, 2 (reduce
    kernel) and 4 (SELF_REDUCE); bias on; fp32 and bf16 x."""
    cases = [(1, _gemv(1, 32, 128, 1)), (2, _gemv(2, 16, 128, 2)), (3, _gemv(4, 64, 128, 4, SELF_REDUCE=True)),
             (4, _gemv(4, 16, 64, 1, num_warps=2)), (16, _gemv(4, 32, 128, 2, SELF_REDUCE=True))]
    for i, (M, config) in enumerate(cases):
        dtype = (torch.float32, torch.bfloat16)[i % 2]
        fmt = ("e4m3fn", "e4m3fnuz")[i % 2]
        x, weight, weight_scale, rest, attrs = _operands(M, N_ODD, K_ODD, dtype, True, variant, fmt)
        what = f"GEMV {variant} {fmt} M={M} {dtype} {config['constexprs']}"
        out = _run(x, weight, weight_scale, rest, attrs, config)
        _close(out, ops.linear_fp8(x, weight, weight_scale, *rest, **attrs), what + " vs reference")
        dot = gemm_fp8.default_config(_problem(M, N_ODD, K_ODD, dtype, True, variant, fmt))
        _close(out, _run(x, weight, weight_scale, rest, attrs, dot), what + " vs dot kernel")


@pytest.mark.parametrize("variant", ["block", "token_channel", "a16_channel", "static_tensor"])
def test_gemv_self_reduce_is_bit_identical(variant):
    """SELF_REDUCE writes the reduce kernel's bits (scales and bias in its order); counters end at 0."""
    x, weight, weight_scale, rest, attrs = _operands(3, N_ODD, 1024, torch.bfloat16, True, variant, "e4m3fn")
    two_kernels = _run(x, weight, weight_scale, rest, attrs, _gemv(4, 32, 128, 4))
    for _ in range(2):
        out = _run(x, weight, weight_scale, rest, attrs, _gemv(4, 32, 128, 4, SELF_REDUCE=True))
        assert torch.equal(out, two_kernels), f"{variant}: max diff {(out - two_kernels).abs().max()}"
    assert not split_k_counters(x.device, 1).any()


@pytest.mark.parametrize("variant,group", [("block", 128), ("channel_group", 128), ("token_channel", 0)])
def test_gemv_prequantized_and_quant_a_equal_the_quant_launch(variant, group):
    """fp8 x from a fused producer (prequantized) and x quantized inside the GEMV (QUANT_A, group
    schemes) give the bits of the quant launch + GEMV; QUANT_A records no quant kernel."""
    M = 4
    x, weight, weight_scale, rest, attrs = _operands(M, N_ODD, K_ODD, torch.bfloat16, True, variant, "e4m3fn")
    config = _gemv(4, 32, 128, 2, SELF_REDUCE=True)
    dynamic = _run(x, weight, weight_scale, rest, attrs, config)
    x_q, x_scale = gemm_fp8.quantize_activations(x, None, "e4m3fn", group, launcher=INTERPRET)
    pre = dict(attrs, act_scheme="prequantized", group=group, out_dtype="bfloat16")
    out = gemm_fp8.linear_fp8(x_q, weight, weight_scale, x_scale.reshape(M, -1), *rest, **pre, config=config,
                              launcher=INTERPRET)
    assert torch.equal(out, dynamic), f"{variant} prequantized: max diff {(out - dynamic).abs().max()}"
    if group:
        fused = _gemv(4, 32, 128, 2, SELF_REDUCE=True, QUANT_A=True)
        out = _run(x, weight, weight_scale, rest, attrs, fused)
        assert torch.equal(out, dynamic), f"{variant} QUANT_A: max diff {(out - dynamic).abs().max()}"
        recorder = RecordingLauncher()
        gemm_fp8.linear_fp8(*(t.to("meta") for t in (x, weight, weight_scale, *rest)), **attrs, config=fused,
                            launcher=recorder)
        assert [c.kernel.rpartition(":")[2] for c in recorder.calls] == ["_fp8_gemv_kernel"]


@pytest.mark.parametrize("change,message", [
    (dict(GROUP_SIZE_M=8), "requires GROUP_SIZE_M 1"),
    (dict(BLOCK_M=32), "requires BLOCK_M a power of two in [1, 16]"),
    (dict(BLOCK_M=3), "requires BLOCK_M a power of two"),
    (dict(BLOCK_K=8), "requires BLOCK_K a power of two in [16, 1024]"),
    (dict(BLOCK_K=256), "requires BLOCK_K dividing the scale block's K 128"),
    (dict(BLOCK_K=64, QUANT_A=True), "QUANT_A requires BLOCK_K == the activation group 128"),
])
def test_gemv_bad_configs_are_clear_errors(change, message):
    x, weight, weight_scale, rest, attrs = _operands(1, 256, 512, torch.bfloat16, False, "block", "e4m3fn",
                                                     device="meta")
    config = _gemv(1, 32, 128, 1)
    config["constexprs"].update(change)
    with pytest.raises(RdnacError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        _run(x, weight, weight_scale, rest, attrs, config, RecordingLauncher())
    assert "GEMV config" in str(info.value)


def test_tune_offers_gemv_at_decode_sizes_only():
    """`rdnac tune` measures GEMV configs (with SELF_REDUCE and, for group schemes, QUANT_A twins) at M <= 16
    and none above; the config space the compiler follows unmeasured never holds one."""
    from rdnac.compiler.tune import candidates

    for scheme in (("block", "dynamic_group", [128, 128]), ("channel", "dynamic_token", None)):
        for M in (1, 2, 4, 16, 32, 64, 2048):
            problem = {"M": M, "N": 6144, "K": 4096, "dtype": "bfloat16", "has_bias": False, "fp8_format": "e4m3fn",
                       "weight_scheme": scheme[0], "act_scheme": scheme[1], "block_size": scheme[2]}
            gemv = [c for c in candidates("gemm_fp8", problem) if c["constexprs"].get("GEMV")]
            assert not any(c["constexprs"].get("GEMV") for c in gemm_fp8.config_space(problem))
            if M > 16:
                assert not gemv, (scheme, M)
                continue
            assert gemv and all(c["constexprs"]["BLOCK_M"] == min(M, 4) for c in gemv), (scheme, M)
            assert any(c["constexprs"].get("SELF_REDUCE") for c in gemv)
            assert any(c["constexprs"].get("QUANT_A") for c in gemv) == (scheme[1] == "dynamic_group")
            if scheme[0] == "block":
                assert all(c["constexprs"]["BLOCK_K"] == 128 for c in gemv)


def test_gemv_candidates_build_for_sm90_and_gfx1201():
    """The M = 1 and M = 4 candidates with one weight row per thread (split 4, SELF_REDUCE, QUANT_A on and
    off) build for both targets within their resources: no spills."""
    from rdnac.compiler.build import check_resources, compile_calls

    recorder = RecordingLauncher()
    for M in (1, 4):
        x, weight, weight_scale, rest, attrs = _operands(M, 4096, 4096, torch.bfloat16, False, "block", "e4m3fn",
                                                         device="meta")
        for quant_a in (False, True):
            for block_n, num_warps in ((16, 4), (32, 8)):
                config = _gemv(min(M, 4), block_n, 128, 4, num_warps, SELF_REDUCE=True, QUANT_A=quant_a)
                _run(x, weight, weight_scale, rest, attrs, config, recorder)
    calls = [c for c in recorder.calls if c.kernel.endswith("_fp8_gemv_kernel")]
    for target in ("sm90", "gfx1201"):
        binaries = compile_calls(calls, target, quiet=True)
        problems = [p for b in binaries for p in check_resources(b, target)]
        assert len(binaries) == 8 and not problems, f"{target}: {problems}"


def test_plans_that_select_the_gemv_compile_for_sm90_and_gfx1201(tmp_path, monkeypatch):
    """A tuning table that measured GEMV fastest at decode puts `_fp8_gemv_kernel` into the plan; the
    plan compiles for sm90 and gfx1201 (the table is faked: lookups answer a GEMV entry at M <= 16)."""
    import rdnac
    from rdnac.compiler import tuning
    from rdnac.plans import read_plan
    from rdnac.testing.fp8 import write_random_checkpoint

    config = _gemv(1, 16, 128, 2, SELF_REDUCE=True)
    real_lookup = tuning.lookup

    def lookup(target, family, problem):
        if family == "gemm_fp8" and problem["M"] <= 16:
            return {"config": config, "candidates": 1, "device": "fake", "us": 1.0, "M": 1, "table": "fake.json"}
        return real_lookup(target, family, problem)

    monkeypatch.setattr(tuning, "lookup", lookup)
    write_random_checkpoint(tmp_path / "ckpt", hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64,
                            intermediate=512, vocab=1000, scheme="fp8-block")
    for target in ("sm90", "gfx1201"):
        plan = rdnac.compile(tmp_path / "ckpt", target, tmp_path / f"{target}.msgpack", quiet=True, max_model_len=256)
        kernels = [k["kernel"] for k in read_plan(plan).body["kernels"]]
        assert any(k.endswith(":_fp8_gemv_kernel") for k in kernels), f"{target}: {sorted(set(kernels))}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/HIP GPU")
def test_gemv_matches_dot_kernel_on_gpu_qwen3_8b_shapes():
    """Qwen3-8B's decode GEMMs (qkv, o, gate_up, down) at M = 1 and 4: every GEMV candidate the tuner
    offers agrees with the default dot config and with the reference."""
    from rdnac.compiler.tune import candidates

    launcher = JitLauncher()
    fmt = "e4m3fnuz" if torch.version.hip and "gfx94" in torch.cuda.get_device_properties(0).gcnArchName else "e4m3fn"
    for N, K in ((6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)):
        for M in (1, 4):
            problem = _problem(M, N, K, torch.bfloat16, False, "block", fmt)
            x, weight, weight_scale, rest, attrs = _operands(M, N, K, torch.bfloat16, False, "block", fmt, "cuda")
            reference = ops.linear_fp8(x.cpu(), weight.cpu(), weight_scale.cpu(), **attrs)
            dot = _run(x, weight, weight_scale, rest, attrs, gemm_fp8.default_config(problem), launcher)
            for config in candidates("gemm_fp8", problem):
                if config["constexprs"].get("GEMV"):
                    out = _run(x, weight, weight_scale, rest, attrs, config, launcher)
                    what = f"GEMV N={N} K={K} M={M} {config}"
                    _close(out, dot, what + " vs dot kernel")
                    _close(out, reference, what + " vs reference")
