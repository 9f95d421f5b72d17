"""The config cost model picks sane GEMM configs for decode and prefill, and says why."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import triton

from rdnac.compiler import cost_model
from rdnac.kernels import gemm


@dataclass(frozen=True)
class StandInTarget:
    """Only the attributes the cost model reads (the real targets live in rdnac/targets/)."""

    name: str
    num_compute_units: int
    hbm_gbps: float
    lds_bytes: int
    warp_size: int


GFX1201 = StandInTarget("gfx1201", 64, 640.0, 64 * 1024, 32)
SM90 = StandInTarget("sm90", 132, 3350.0, 227 * 1024, 32)
TARGETS = [GFX1201, SM90]


def _config(block_m, block_n, block_k, group_size_m=1, split_k=1, num_warps=4, num_stages=2):
    return {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                           "GROUP_SIZE_M": group_size_m, "SPLIT_K": split_k},
            "num_warps": num_warps, "num_stages": num_stages}


def _problem(M, N, K):
    return {"M": M, "N": N, "K": K, "dtype": "bfloat16", "has_bias": False}


def _best(problem, candidates, target):
    return cost_model.rank("linear", problem, candidates, target)[0]


PREFILL_TILE = _config(128, 128, 64, group_size_m=8, num_warps=8)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_decode_large_weight_prefers_split_k_or_narrow_tiles(target):
    # M=1 against a 576 x 4608 weight (a down projection): 9 tiles of 64 cannot fill the GPU.
    problem = _problem(1, 576, 4608)
    candidates = gemm.config_space(problem) + [PREFILL_TILE, _config(64, 128, 64, group_size_m=8)]
    config, est = _best(problem, candidates, target)
    c = config["constexprs"]
    assert c["BLOCK_M"] == 16 and (c["SPLIT_K"] > 1 or c["BLOCK_N"] <= 32), (config, est.reason)
    prefill_est = cost_model.estimate("linear", problem, PREFILL_TILE, target)
    assert est.est_time_us < 0.7 * prefill_est.est_time_us, (est.reason, prefill_est.reason)


def test_decode_split_k_beats_one_pass_when_few_tiles():
    # On sm90 the bandwidth x latency product is large: 9 programs reach ~5% of HBM.
    problem = _problem(1, 576, 4608)
    one_pass = cost_model.estimate("linear", problem, _config(16, 64, 128), SM90)
    split = cost_model.estimate("linear", problem, _config(16, 64, 128, split_k=8), SM90)
    assert split.tiles == 8 * one_pass.tiles
    assert split.bytes_moved > one_pass.bytes_moved  # the fp32 partials
    assert split.est_time_us < 0.5 * one_pass.est_time_us, (split.reason, one_pass.reason)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_decode_split_k_not_worth_it_when_tiles_fill_the_gpu(target):
    # A 49152-row LM head already launches hundreds of tiles at M=1.
    problem = _problem(1, 49152, 576)
    config, est = _best(problem, gemm.config_space(problem), target)
    assert config["constexprs"]["SPLIT_K"] == 1, est.reason


@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_decode_prefers_group_size_1_and_16_row_tiles(target, M):
    problem = _problem(M, 1536, 576)
    candidates = []
    for block_n in (32, 64, 128):
        for group in (8, 4, 1):  # the grouped variants first: order must not decide
            for block_m in (64, 16):
                candidates.append(_config(block_m, block_n, 64, group_size_m=group))
    config, est = _best(problem, candidates, target)
    assert config["constexprs"]["GROUP_SIZE_M"] == 1 and config["constexprs"]["BLOCK_M"] == 16, est.reason
    wide = cost_model.estimate("linear", problem, _config(64, 64, 64), target)
    narrow = cost_model.estimate("linear", problem, _config(16, 64, 64), target)
    assert narrow.est_time_us < wide.est_time_us and narrow.flops < wide.flops


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_prefill_prefers_large_grouped_tiles(target):
    problem = _problem(2048, 1536, 576)
    decode_tiles = gemm.config_space(_problem(1, 1536, 576))
    ranked = cost_model.rank("linear", problem, decode_tiles + gemm.config_space(problem), target)
    config, est = ranked[0]
    c = config["constexprs"]
    assert c["BLOCK_M"] >= 64 and c["BLOCK_N"] >= 64 and c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 128, est.reason
    assert c["GROUP_SIZE_M"] > 1 and c["SPLIT_K"] == 1, est.reason
    decode_best = min(cost_model.estimate("linear", problem, d, target).est_time_us for d in decode_tiles)
    assert est.est_time_us < decode_best / 2


def test_config_over_lds_is_rejected_with_reason():
    # The lesson from the gfx1201 bring-up: BLOCK_N=256 does not fit 64 KiB of LDS.
    problem = _problem(2048, 1536, 576)
    big = _config(128, 256, 64, group_size_m=8, num_warps=8, num_stages=3)
    est = cost_model.estimate("linear", problem, big, GFX1201)
    assert not est.is_feasible and est.occupancy == 0 and math.isinf(est.est_time_us)
    assert "96 KiB LDS" in est.reason and "64 KiB" in est.reason, est.reason
    assert cost_model.estimate("linear", problem, big, SM90).is_feasible
    ranked = cost_model.rank("linear", problem, [big, PREFILL_TILE], GFX1201)
    assert ranked[0][0] is PREFILL_TILE and ranked[-1][0] is big


def test_estimate_fields_are_consistent():
    problem = _problem(7, 1823, 781)
    est = cost_model.estimate("linear", problem, _config(16, 64, 128, split_k=2), GFX1201)
    assert est.tiles == 1 * 29 * 2
    assert est.waves == 1 and est.occupancy >= 1
    weight, act, out, partials = 1823 * 781 * 2, 7 * 781 * 2 * 29, 7 * 1823 * 2, 2 * 2 * 7 * 1823 * 4
    assert est.bytes_moved == weight + act + out + partials
    assert est.flops == 2 * 16 * (29 * 64) * 781
    assert est.est_time_us > 2 * cost_model.LAUNCH_US  # two launches at least
    logits = cost_model.estimate("logits", problem, _config(16, 64, 128, split_k=2), GFX1201)
    assert logits.bytes_moved == est.bytes_moved + 7 * 1823 * 2  # float32 output


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
@pytest.mark.parametrize("M,N,K", [(1, 576, 4608), (1, 49152, 576), (16, 3072, 576), (2048, 1536, 576)])
def test_reasons_are_readable(target, M, N, K):
    problem = _problem(M, N, K)
    candidates = gemm.config_space(problem) + [_config(128, 256, 128, group_size_m=8, num_stages=3)]
    for config, est in cost_model.rank("linear", problem, candidates, target):
        reason = est.reason
        assert "\n" not in reason and 20 < len(reason) < 400, reason
        assert "{" not in reason and "None" not in reason and "nan" not in reason, reason
        if est.is_feasible:
            assert reason.split()[0] in ("memory-bound", "compute-bound"), reason
            assert "GB/s" in reason and " us" in reason and "wave" in reason, reason
        else:
            assert reason.startswith("does not fit: "), reason


def test_unknown_target_peak_is_guessed_and_said():
    target = StandInTarget("gfx9999", 32, 500.0, 64 * 1024, 64)
    est = cost_model.estimate("linear", _problem(2048, 1536, 576), PREFILL_TILE, target)
    assert est.is_feasible and "peak guessed" in est.reason


def test_unknown_family_or_cpu_target_is_an_error():
    with pytest.raises(ValueError, match="family"):
        cost_model.estimate("conv2d", _problem(1, 1, 1), PREFILL_TILE, GFX1201)
    with pytest.raises(ValueError, match="GPU target"):
        cost_model.estimate("linear", _problem(1, 1, 1), PREFILL_TILE, StandInTarget("cpu", 0, 0.0, 0, 1))


@pytest.mark.parametrize("config", [_config(16, 64, 128), _config(128, 256, 64, group_size_m=8, num_warps=8),
                                    _config(64, 128, 64, group_size_m=8, num_stages=3)],
                         ids=lambda c: "x".join(str(c["constexprs"][k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")))
def test_lds_model_matches_gfx1201_cross_compile(config):
    # Cross-compiling needs no GPU: the model's LDS figure is what Triton allocates.
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rdnac.kernels.launch import full_constexprs

    kernel = gemm._gemm_kernel
    flags = full_constexprs(kernel, dict({"SELF_REDUCE": False}, **config["constexprs"], HAS_GATHER=False,
                                         HAS_BIAS=True, HAS_SOFTCAP=False))  # every other constexpr at its default
    ints = {"M", "N", "K", "stride_xm", "stride_wn", "stride_om", "k_per_split"}
    signature = {name: "constexpr" if name in flags else "i32" if name in ints else "fp32" if name == "softcap"
                 else "*i64" if name == "idx_ptr" else "*bf16" for name in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if name.endswith("_ptr") or name in ints - {"M"}}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in flags.items()},
                       attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("hip", "gfx1201", 32),
                              options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    assert compiled.metadata.shared == cost_model.lds_bytes_per_program(config, "bfloat16", GFX1201)


def _attention_problem(phase, tokens, head_dim=128):  # Qwen3-8B / Llama-3.1-8B widths
    return {"phase": phase, "num_heads": 32, "num_kv_heads": 8, "head_dim": head_dim, "block_size": 16,
            "max_model_len": 32768, "dtype": "bfloat16", "kv_dtype": "bfloat16", "num_seqs": 1,
            "num_tokens": tokens}


@pytest.mark.parametrize("tokens", [2048, 16384])
def test_attention_prefill_picks_128x128_on_8_warps_on_sm90(tokens):
    """The tile the H100/H200 measured fastest (128x128, 8 warps, 4 stages, rdnac/compiler/tuned/sm90.json) is
    the model's first pick at 2k and 16k; 16-row tiles (half-rate dots on sm90) rank below every 128-row one."""
    from rdnac.kernels import attention

    problem = _attention_problem("prefill", tokens)
    ranked = cost_model.rank("attention", problem, attention.config_space(problem), SM90)
    (best, est), *_ = ranked
    assert best == attention._config(8, 4, BLOCK_M=128, BLOCK_N=128), est.reason
    assert est.is_feasible and "key-tile visits" in est.reason
    order = [c["constexprs"]["BLOCK_M"] for c, _ in ranked]
    assert max(i for i, m in enumerate(order) if m == 128) < min(i for i, m in enumerate(order) if m == 16)


@pytest.mark.parametrize("target", [GFX1201, StandInTarget("gfx942", 304, 5300.0, 64 * 1024, 64),
                                    StandInTarget("gfx950", 256, 8000.0, 160 * 1024, 64)], ids=lambda t: t.name)
def test_attention_prefill_tiles_over_the_lds_do_not_fit(target):
    from rdnac.kernels import attention

    problem = _attention_problem("prefill", 2048)
    for config, est in cost_model.rank("attention", problem, attention.config_space(problem), target):
        fits = attention.prefill_lds_bytes(config, 128) <= target.lds_bytes
        assert est.is_feasible == fits, (config, est.reason)
        if not fits:
            assert est.reason.startswith("does not fit") and target.name in est.reason
    best = cost_model.rank("attention", problem, attention.config_space(problem), target)[0][0]
    assert best["constexprs"]["BLOCK_M"] >= 64  # a wide query tile wherever one fits


def test_attention_decode_order_is_the_family_default_then_the_space():
    from rdnac.kernels import attention

    problem = _attention_problem("decode", 1)
    space, default = attention.config_space(problem), attention.default_config(problem)
    ranked = cost_model.rank("attention", problem, space, SM90)
    assert [c for c, _ in ranked] == [default] + [c for c in space if c != default]
    assert ranked[0][1].reason == "family default"
