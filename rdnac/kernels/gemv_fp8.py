"""FP8 GEMV: the decode (M <= 16) form of the FP8 GEMM family, chosen by the config constexpr GEMV.

`rdnac.kernels.gemm_fp8.linear_fp8` dispatches here when its config has GEMV True; it prepares the
operands (x quantized, or not, exactly as for the dot kernels) and launches `_fp8_gemv_kernel` with
the block kernel's arguments, then the family's split-K reduce kernel when there is one to run.

At M = 1 the dot kernels pad the 16-row tile of the smallest FP8 dot and keep few bytes in flight.
Here there is no dot: each program streams fp8 weight tiles [BLOCK_N, BLOCK_K] (contiguous along K:
16-byte loads), converts them to fp32, multiplies them by the BLOCK_M activation rows broadcast
along N ([BM, BN, BK]) and reduces along K into fp32 accumulators [BM, BN]. The next step's weight
and x tiles are loaded before this step's arithmetic (a register double buffer), so each program
keeps two tiles in flight; split-K (SELF_REDUCE, as gemm.py) multiplies the programs. Little's law
on an H200: ~4 TB/s x ~1 us / 132 SMs ~ 32 KB in flight per SM.

Numerics equal the dot kernels' up to fp32 summation order: the products are exact in fp32 (fp8 x
fp8, or bf16 x fp8 for a16w8), block scales multiply each BLOCK_K step's partial sum as
`_fp8_block_gemm_kernel` does (acc += partial * a_scale * w_scale), per-token/per-channel/per-tensor
scales multiply once in the epilogue as `_fp8_gemm_kernel` does, and QUANT_A quantizes x's groups by
`_quant_fp8_kernel`'s rule (the same bits). Every act scheme and weight scheme of the family runs here.

Configs: `gemv_configs(problem)`, offered only to measurement (`rdnac tune`, decode sizes), as QUANT_A
and SELF_REDUCE are; never in `config_space`. Unmeasured, the compiler takes this family's
`default_config` and then the space's order (the cost model ranks only gemm and gemm_gated), and the
roofline there models dot tiles (flops padded to BLOCK_M, operand stages in LDS), not this kernel's
register double buffer: it could not rank a GEMV against a dot tile without a model of its own.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.errors import RdnacError
from rdnac.kernels.gemm import DECODE_MAX_M, _config, m_bucket
from rdnac.kernels.launch import cdiv

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_fp8_gemv_kernel": ("N", "K", "stride_am", "stride_wn", "stride_om", "k_per_split")}

MAX_BLOCK_M = 16
SPLIT_K_MIN_NK = 1 << 20  # as the dot kernels: split K only when the weight read beats the extra work
# tl.max and tl.sum are jit functions, which the interpreter launcher cannot call: tl.reduce with these
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _fp8_gemv_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, final_ptr, counter_ptr,
                     M, N, K, stride_am, stride_wn, stride_om, stride_asm, stride_ask,
                     stride_wsn, stride_wsk, k_per_split,
                     IS_A16: tl.constexpr, HAS_BIAS: tl.constexpr, IS_BLOCK: tl.constexpr,
                     SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, SELF_REDUCE: tl.constexpr,
                     QUANT_A: tl.constexpr = False, FP8_MAX: tl.constexpr = 0.0,
                     MIN_NORMAL: tl.constexpr = 0.0, SUBNORMAL_ROUNDER: tl.constexpr = 0.0,
                     PDL: tl.constexpr = False):
    # a: [M, K] fp8 (x itself if IS_A16 or QUANT_A); w: [N, K] fp8. IS_BLOCK: per-step scales
    # a_scale[m * stride_asm + kb * stride_ask], w_scale[(n // SCALE_BLOCK_N) * stride_wsn + kb * stride_wsk],
    # kb = k // SCALE_BLOCK_K; otherwise a_scale[m * stride_asm] and w_scale[n * stride_wsn] once, at the
    # end (zero strides broadcast). out: [M, N], or the fp32 workspace [SPLIT_K, M, N] (scaled if IS_BLOCK).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin = pid_k * k_per_split  # a multiple of BLOCK_K, so every step lies in one scale block
    k_end = tl.minimum(k_begin + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)[None, None, :]  # [1, 1, BK]
    # Tiles are 3-D from the load on, so the product and its reduction run in the weight load's layout
    # (16 bytes of K per thread): 2-D tiles broadcast into a product took a default 3-D layout, and the
    # weight tile made a shared-memory round trip on every step (sm90 TTGIR).
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :, None] * stride_wn + (k_begin + offs_k)  # [1, BN, BK]
    # x's pointers are broadcast along N before the load (repeated addresses hit L1), so x loads in the
    # weight's layout: a [BM, 1, BK] load took a layout of its own and the weight tile was converted to it.
    a_ptrs = (a_ptr + offs_m.to(tl.int64)[:, None, None] * stride_am + (k_begin + offs_k)
              + 0 * offs_n[None, :, None])  # [BM, BN, BK]
    w_mask = mask_n[None, :, None]
    a_mask = mask_m[:, None, None]
    a_scale_rows = a_scale_ptr + offs_m * stride_asm  # [BM]
    w_scale_cols = w_scale_ptr + (offs_n // SCALE_BLOCK_N) * stride_wsn  # [BN]
    # The first weight tile is loaded before the wait: no kernel writes weights (plan constants), so
    # the read overlaps the previous kernel's tail. x, its scales and the workspace are read after.
    w_next = tl.load(w_ptrs, mask=w_mask & (offs_k < k_end - k_begin), other=0.0)
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    a_next = tl.load(a_ptrs, mask=a_mask & (offs_k < k_end - k_begin), other=0.0)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        w = w_next.to(tl.float32)  # [1, BN, BK]
        xa = a_next.to(tl.float32)  # [BM, BN, BK], equal along N
        # Load the next step's tiles now (masked off past k_end), so they are in flight during this step.
        k_left_next = k_end - k0 - BLOCK_K
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_next = tl.load(w_ptrs, mask=w_mask & (offs_k < k_left_next), other=0.0)
        a_next = tl.load(a_ptrs, mask=a_mask & (offs_k < k_left_next), other=0.0)
        if QUANT_A:  # x's [BM, BLOCK_K == group] tile to the FP8 grid, as _fp8_block_gemm_kernel's QUANT_A
            amax = tl.reduce(tl.abs(xa), 2, _MAX)  # [BM, BN], equal along N
            a_scale = tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)  # a zero group: 1, not 0/0
            v = tl.minimum(tl.maximum(tl.div_rn(xa, a_scale[:, :, None]), -FP8_MAX), FP8_MAX)
            mag = tl.abs(v)  # ties to even in fp32 (see fp8_quant.py); exact FP8 values, kept in fp32
            bits = mag.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
            subnormal = (mag + SUBNORMAL_ROUNDER) - SUBNORMAL_ROUNDER
            mag = tl.where(mag < MIN_NORMAL, subnormal, normal)
            xa = tl.where((v < 0) & (mag > 0), -mag, mag)
        partial = tl.reduce(xa * w, 2, _SUM)  # [BM, BN] fp32; exact products
        if IS_BLOCK:
            kb = k0 // SCALE_BLOCK_K
            w_scale = tl.load(w_scale_cols + kb * stride_wsk, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
            if IS_A16:
                acc += partial * w_scale[None, :]
            else:
                if not QUANT_A:
                    a_scale = tl.load(a_scale_rows + kb * stride_ask, mask=mask_m, other=0.0).to(tl.float32)[:, None]
                # [BM, BN] partial x [BM, 1 or BN] row scale x [1, BN] column scale
                acc += partial * a_scale * w_scale[None, :]
        else:
            acc += partial
    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (see gemm_fp8.py)
        gdc_launch_dependents()
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:  # the epilogue of _fp8_gemm_kernel (scales once) or _fp8_block_gemm_kernel (bias only)
        if not IS_BLOCK:
            if not IS_A16:
                acc *= tl.load(a_scale_rows, mask=mask_m, other=1.0).to(tl.float32)[:, None]
            acc *= tl.load(w_scale_cols, mask=mask_n, other=1.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # as the dot kernels: the last split sums in _fp8_splitk_reduce_kernel's order (SELF_REDUCE)
        tl.store(out_ptr + pid_k * M * N + out_offs, acc, mask=out_mask)
        if SELF_REDUCE:
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(out_ptr + s * M * N + out_offs, mask=out_mask, other=0.0, cache_modifier=".cg")
                if not IS_BLOCK:
                    if not IS_A16:
                        total *= tl.load(a_scale_rows, mask=mask_m, other=1.0).to(tl.float32)[:, None]
                    total *= tl.load(w_scale_cols, mask=mask_n, other=1.0).to(tl.float32)[None, :]
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
                tl.store(final_ptr + offs_m[:, None] * N + offs_n[None, :],
                         total.to(final_ptr.dtype.element_ty), mask=out_mask)
                tl.store(counter_ptr + pid, 0)


def check_config(config: dict, scale_block_k: int | None, group: int, quant_a: bool) -> None:
    """Raise a clear error for a GEMV config this kernel cannot run (never a silent fallback).

    scale_block_k: the K extent of one scale step on the block path (None off it); group: x's
    quantization group (0 when none); quant_a: the GEMV quantizes x itself."""
    c = config["constexprs"]
    where = f"linear_fp8 GEMV config {c}"
    block_m, block_n, block_k = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    if c.get("GROUP_SIZE_M", 1) != 1:
        raise RdnacError(f"{where}: requires GROUP_SIZE_M 1 (the GEMV walks row tiles in order); "
                         f"got {c['GROUP_SIZE_M']}; set it to 1")
    for name, value, low, high in (("BLOCK_M", block_m, 1, MAX_BLOCK_M), ("BLOCK_N", block_n, 1, 1024),
                                   ("BLOCK_K", block_k, 16, 1024)):
        if not (low <= value <= high and value & (value - 1) == 0):
            raise RdnacError(f"{where}: requires {name} a power of two in [{low}, {high}]; got {value}")
    if scale_block_k is not None and scale_block_k % block_k:
        raise RdnacError(f"{where}: requires BLOCK_K dividing the scale block's K {scale_block_k} (one scale "
                         f"per step); got {block_k}; use BLOCK_K {min(scale_block_k, 128)}")
    if quant_a and block_k != group:
        raise RdnacError(f"{where}: QUANT_A requires BLOCK_K == the activation group {group}; got {block_k}")


def gemv_configs(problem: dict) -> list[dict]:
    """GEMV candidates for `rdnac tune` at decode sizes (M bucket <= 16; none above).

    BLOCK_M holds the bucket's rows up to 4 (each row adds BLOCK_K / 8 fp32 registers per thread per
    weight row it holds; more rows spill). BLOCK_K is the scale block's K on the block path, else 128
    or 256. A warp covers 512 / BLOCK_K weight rows per pass (16 bytes of K per thread), so BLOCK_N is
    one or two passes of 4 or 8 warps: one 16-byte weight load per thread and step, or two. Split-K
    as the dot kernels' decode candidates (each split keeping >= 2 steps)."""
    M, N, K = m_bucket(problem["M"]), problem["N"], problem["K"]
    if M > DECODE_MAX_M:
        return []
    if problem["weight_scheme"] == "block":
        block_ks = (min(problem["block_size"][1], 128),)
    elif problem["act_scheme"] == "dynamic_group":
        block_ks = (problem["block_size"][1],)
    elif problem["act_scheme"] == "prequantized" and problem.get("group"):
        block_ks = (problem["group"],)
    else:
        block_ks = (128, 256)
    out = []
    for block_k in block_ks:
        rows_per_pass = max(1, 512 // block_k)  # per warp
        for num_warps in (4, 8):
            for passes in (1, 2):
                block_n = rows_per_pass * num_warps * passes
                for split in (1, 2, 4, 8, 16):
                    k_per_split = cdiv(cdiv(K, split), block_k) * block_k
                    if split > 1 and (N * K < SPLIT_K_MIN_NK or k_per_split < 2 * block_k
                                      or cdiv(K, k_per_split) != split):
                        continue
                    config = _config(min(M, 4), block_n, block_k, 1, split, num_warps, 1)
                    config["constexprs"]["GEMV"] = True
                    out.append(config)
    return out
