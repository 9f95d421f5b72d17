"""The cost model's estimate for paged attention (`rdnac.compiler.cost_model.ESTIMATORS["attention"]`).

Kernel selection ranks the attention family's configs with it: prefill tiles by a compute model of the
causal key-tile walk (below), with a "does not fit" for tiles over the target's LDS; decode configs keep
the family's order (its default, measured per target, first). Same units and `Estimate` as the GEMM model.
"""

from __future__ import annotations

import math

from rdnac.compiler.cost_model import (ALU_OPS_PER_CU_US, DEFAULT_ALU_OPS_PER_CU_US, DEFAULT_MAX_WARPS_PER_CU,
                                       ELEMENT_BYTES, LAUNCH_US, MAX_WARPS_PER_CU, OVERLAP_LOSS, SPILL_SLOWDOWN,
                                       Estimate, _dtype_name, _peak_tflops)
from rdnac.kernels import attention

# Paged prefill attention (rdnac.kernels.attention). Softmax work per score on the vector ALUs, in issue slots:
# one exp2 (sm90's MUFU issues 16 a clock per SM against 128 FP32 lanes: 8 slots; AMD's v_exp_f32 is
# quarter rate: 4), and the max, the FMA, the row sum, the bf16 conversion and (diagonal tiles) the mask.
EXP_SLOTS = {"sm90": 8}
DEFAULT_EXP_SLOTS = 4
SOFTMAX_OPS_PER_SCORE = 5
# Fixed work per key tile of one program, per thread (block-table loads, K/V addresses, loop, barriers).
ATTN_TILE_OPS_PER_THREAD = 128
L2_OVER_HBM = 3.0  # K/V tiles are re-read by every query tile of a kv head: from L2, ~3x HBM bandwidth
# The AMD targets' spill-free prefill tiles, from Triton 3.9 cross-compiles at head_dim 128 (2026-12-07): (the
# most keys a tile holds x head_dim / 128, the most stages; None: any). CDNA (wave64) spilled every 64-key tile
# tried (16-50 registers), gfx1201 every 64-key one and 64x32 on 4 warps, gfx1151 every 32-key tile and every
# 16-key one past 1 stage. A config past these is ranked as spilling (x SPILL_SLOWDOWN); the compiled binary
# still decides (select_kernels rejects what spills and logs it).
AMD_SPILL_FREE = {"gfx942": (32, None), "gfx950": (32, None), "gfx1201": (32, None), "gfx1151": (16, 1)}
# Heads of 256 and wider (cross-compiles at head_dim 256, GQA 8, 2026-12-07), per target: (the most
# BLOCK_M x BLOCK_N scores per warp of a whole-head tile, of a head-dim-chunked one (BLOCK_DK < BLOCK_D), the
# most stages of a chunked one; None: any). Whole-head: gfx1151 spilled every tile (0); gfx1201 fits 32x32 on
# 8 warps (128) and spills 64x32 on 4 or 8; gfx950 spills 64x32 on 4 warps (512), not on 8; gfx942 fits both.
# Chunked, the accumulator's rows per warp at most 8 (64x32 on 4 warps spilled on gfx1201): gfx1151 fits
# 64x32 on 8 warps (256) and spills 64x64; gfx1201 fits 64x64 on 8 (512); gfx942 spills 128x64 on 8 (1024);
# gfx950 fits 64x32 on 8 at 1 stage and spills 4-12 registers at 2 stages. A sliding window (Gemma 3, GQA 2) adds
# registers: gfx1151's 64x32 on 8 warps spilled 1 at 2 stages there, and selection took its 1-stage twin (254).
AMD_SPILL_FREE_WIDE_HEAD = {"gfx942": (512, 512, None), "gfx950": (256, 256, 1), "gfx1201": (128, 512, None),
                            "gfx1151": (0, 256, None)}


def estimate_attention(problem: dict, config: dict, target) -> Estimate:
    """Causal prefill of one sequence of T tokens (chunked prefill and batches rank the same way). Work is
    counted in key-tile visits: query tile i (BLOCK_M rows = BLOCK_M / GROUP tokens, GQA packed) visits
    ceil(min(T, (i + 1) * BLOCK_M / GROUP) / BLOCK_N) key tiles, the diagonal one in full. Per visit, on one
    CU: the two dots (4 * BLOCK_M * BLOCK_N * BLOCK_D flops at the CU's share of peak; half rate when a
    warpgroup holds fewer than 64 rows on sm90, whose wgmma is 64 rows tall), the softmax on the vector ALUs
    (EXP_SLOTS + SOFTMAX_OPS_PER_SCORE + BLOCK_D / BLOCK_N accumulator rescales per score), the K/V tile from
    L2 and ATTN_TILE_OPS_PER_THREAD. Dots and softmax overlap only where warpgroups drift apart (half of the smaller
    is lost); the K/V load hides behind them by the pipeline's depth (the moe estimate's rule), not at all at
    1 stage unless another program is resident. Time = the larger of the visits spread over every CU and the
    longest program (the last query tile), + a launch. Not fitted to measurements: it ranks. Its absolute
    times are optimistic: 62 us for Qwen3-8B's 2048-token prefill at 128x128, 8 warps, 4 stages, which the
    kernel before issue 29 ran in 136.5 us on an H200 at a power-throttled clock (rdnac/compiler/tuned)."""
    if problem["phase"] == "decode":  # measured per target instead: the family default first, then the space
        from rdnac.kernels import attention_decode  # the family's space (the lean wide-head tiles first)

        space = attention_decode.config_space(problem)
        rank = 0 if config == attention.default_config(problem) else 1 + (space.index(config) if config in space
                                                                          else len(space))
        return Estimate(0, 0, 0, 0, 1, float(rank), "family default" if rank == 0 else "next in the config space")
    c = config["constexprs"]
    block_m, block_n, warps, stages = c["BLOCK_M"], c["BLOCK_N"], config["num_warps"], config["num_stages"]
    group, head_dim = problem["num_heads"] // problem["num_kv_heads"], problem["head_dim"]
    block_d = 1 << max(0, head_dim - 1).bit_length()
    T, num_cu = problem["num_tokens"], target.num_compute_units
    dtype = _dtype_name(problem.get("dtype", "bfloat16"))
    elt = ELEMENT_BYTES[dtype]
    m_tiles = math.ceil(T * group / block_m)
    programs = m_tiles * problem["num_kv_heads"] * problem.get("num_seqs", 1)
    lds = attention.prefill_lds_bytes(config, head_dim, min(elt, 2))
    if lds > target.lds_bytes:
        return Estimate(0, 0, programs, 0, 0, math.inf, f"does not fit: needs ~{lds // 1024} KiB LDS per program "
                        f"(Q tile + 2 K/V stages), {target.name} has {target.lds_bytes // 1024} KiB")
    occupancy = max(1, min(target.lds_bytes // lds, MAX_WARPS_PER_CU.get(target.name, DEFAULT_MAX_WARPS_PER_CU)
                           // warps))
    visits_per_head = [math.ceil(min(T, math.ceil((i + 1) * block_m / group)) / block_n) for i in range(m_tiles)]
    visits = sum(visits_per_head) * problem["num_kv_heads"] * problem.get("num_seqs", 1)
    peak, peak_note = _peak_tflops(target, dtype)
    rows_per_warpgroup = block_m / max(1, warps * target.warp_size // 128)
    mma_rate = 0.5 if target.name == "sm90" and rows_per_warpgroup < 64 else 1.0
    mma_us = 4 * block_m * block_n * block_d / (peak * 1e6 / num_cu * mma_rate)
    alu = ALU_OPS_PER_CU_US.get(target.name, DEFAULT_ALU_OPS_PER_CU_US)
    per_score = EXP_SLOTS.get(target.name, DEFAULT_EXP_SLOTS) + SOFTMAX_OPS_PER_SCORE + block_d / block_n
    alu_us = block_m * block_n * per_score / alu + ATTN_TILE_OPS_PER_THREAD * target.warp_size * warps / alu
    chunked = c.get("BLOCK_DK", block_d) < block_d  # Q . K^T over head-dim chunks: Q re-read per key tile
    tile_bytes = (2 * block_n + (block_m if chunked else 0)) * block_d * elt
    load_us = tile_bytes / (target.hbm_gbps * 1e3 * L2_OVER_HBM / num_cu)
    compute_us = max(mma_us, alu_us) + 0.5 * min(mma_us, alu_us)
    hidden = 2 / max(2, stages) * OVERLAP_LOSS if stages > 1 else 1.0 / occupancy
    visit_us = max(compute_us, load_us) + hidden * min(compute_us, load_us)
    est_us = max(visits * visit_us / num_cu, max(visits_per_head) * visit_us) + LAUNCH_US
    spills = _likely_spills(target.name, block_m, block_n, block_d, warps, stages, chunked)
    if spills:
        est_us *= SPILL_SLOWDOWN
    flops = visits * 4 * block_m * block_n * block_d
    causal_flops = 4 * problem["num_heads"] * head_dim * T * (T + 1) / 2
    reason = (f"compute-bound {est_us:.1f} us (~{causal_flops / est_us / 1e6:.0f} TFLOP/s causal{peak_note}): "
              f"{visits} key-tile visits ({flops / causal_flops:.0%} of the causal flops as padded tiles) x "
              f"{visit_us:.2f} us on {num_cu} CUs (dots {mma_us:.2f}, softmax {alu_us:.2f}, K/V from L2 "
              f"{load_us:.2f} us, {stages} stage(s)); {programs} programs, LDS ~{lds // 1024} KiB, "
              f"{occupancy}/CU resident" + ("; under 64 rows per warpgroup: half-rate dots" if mma_rate < 1 else "")
              + ("; Q . K^T in head-dim chunks (Q re-read per key tile)" if chunked else "")
              + (f"; likely spills on {target.name} (x{SPILL_SLOWDOWN:g}, AMD_SPILL_FREE)" if spills else ""))
    return Estimate(int(visits * 2 * block_n * block_d * elt), int(flops), programs, math.ceil(programs / num_cu),
                    occupancy, est_us, reason)


def _likely_spills(target: str, block_m: int, block_n: int, block_d: int, warps: int, stages: int,
                   chunked: bool) -> bool:
    """Whether a prefill tile is past the spill-free limits measured for an AMD target (AMD_SPILL_FREE up to
    head_dim 128, AMD_SPILL_FREE_WIDE_HEAD from 256); other targets: never (the binary still decides)."""
    if block_d >= 256 and target in AMD_SPILL_FREE_WIDE_HEAD:
        whole, chunk, chunk_stages = AMD_SPILL_FREE_WIDE_HEAD[target]
        per_warp = block_m * block_n / warps
        if chunked:
            return (per_warp > chunk or block_m / warps > 8
                    or (chunk_stages is not None and stages > chunk_stages))
        return per_warp > whole
    keys, most_stages = AMD_SPILL_FREE.get(target, (None, None))
    return ((keys is not None and block_n * block_d > keys * 128)
            or (most_stages is not None and stages > most_stages))
