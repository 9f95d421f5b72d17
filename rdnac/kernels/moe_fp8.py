"""The grouped GEMM of the fused MoE (`rdnac.kernels.moe`) with FP8 block-scaled experts.

IR op `moe_experts_fp8_block` (reference: `rdnac.ir.moe`): DeepSeek-V3/R1's native experts, FP8 bits with one
float32 scale per 128x128 block, kept as stored. The program layout is `moe_gemm._moe_gemm_kernel`'s (BLOCK_M
rows of one expert's sorted slots, BLOCK_N output columns, the sentinel on padding rows, an early return past
the padded total) and so is the epilogue (`moe_gemm._moe_epilogue`: activation for GATED, routing weight for
the down projection). The K loop is `gemm_fp8._fp8_block_gemm_kernel`'s: BLOCK_K divides the scale block's K,
so every step lies in one block, and each step's product is scaled once,

    acc += dot(a_fp8, w_fp8) * a_scale[row, kb] * w_scale[n // SCALE_BLOCK_N, kb]        kb = k0 // SCALE_BLOCK_K

where a is the activations quantized per (row, SCALE_BLOCK_K columns) by `fp8_quant.quantize_activations`
before the launch (x for gate/up, the [T*k, I] intermediate for down). With IS_A16 (targets without an FP8 dot:
gfx1151) a is x's dtype and the weight tile is upcast in registers: acc += dot(a, w) * w_scale.
Gate rows n and up rows I + n of w13 have their own scale rows: the gate's ceil(I / SCALE_BLOCK_N) blocks,
then the up's (`rdnac.ir.moe`), so a block never spans both and I need not be a multiple of 128.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.moe_gemm import _moe_epilogue, expert_block

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_moe_fp8_block_gemm_kernel": ("N", "K", "stride_am", "stride_we", "stride_wn", "stride_se",
                                                "stride_sn", "stride_om")}


@triton.jit
def _fp8_block_step(acc, a, a_scale, w_ptr, ws_ptr, rows, srows, k0, offs_k, k_left, mask_n, kb,
                    IS_A16: tl.constexpr):
    """acc [BM, BN] += one BLOCK_K step of the rows `rows` (weight) scaled by their block's scales."""
    b = tl.load(w_ptr + rows[None, :] + (k0 + offs_k)[:, None], mask=(offs_k[:, None] < k_left) & mask_n[None, :],
                other=0.0)  # [BK, BN] fp8
    w_scale = tl.load(ws_ptr + srows + kb, mask=mask_n, other=0.0)  # [BN]
    if IS_A16:  # an else branch, not an early return: Triton would still build the FP8 dot after it
        acc += tl.dot(a, b.to(a.dtype), input_precision="ieee") * w_scale[None, :]
    else:
        acc += tl.dot(a, b) * (a_scale[:, None] * w_scale[None, :])
    return acc


@triton.jit
def _moe_fp8_block_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, ws_ptr, rw_ptr, out_ptr, sorted_ptr, block_expert_ptr,
                               num_padded_ptr, num_slots, N, K, stride_am, stride_asm, stride_we, stride_wn,
                               stride_se, stride_sn, stride_om, alpha, limit,
                               GATED: tl.constexpr, ROW_DIV: tl.constexpr, ACT: tl.constexpr, IS_A16: tl.constexpr,
                               SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    # a: [*, K] fp8 (x's dtype if IS_A16), row s // ROW_DIV for slot s, its scales a_scale [*, cdiv(K, SBK)] f32;
    # w: [E, N (x2 if GATED), K] fp8, scales ws [E, cdiv(N, SBN) (x2 if GATED), cdiv(K, SBK)] f32;
    # rw: routing weights [num_slots] f32 (not GATED); out: [num_slots, N].
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):  # past the last expert's blocks: nothing to do
        return
    expert, slots, mask_m, a_row, offs_n, mask_n = expert_block(pid_m, pid_n, block_expert_ptr, sorted_ptr,
                                                                num_slots, N, ROW_DIV, BLOCK_M, BLOCK_N)
    rows = expert * stride_we + offs_n.to(tl.int64) * stride_wn  # [BN] gate (or only) weight rows
    up_rows = rows + N * stride_wn  # [BN] the matching up rows (GATED)
    srows = expert * stride_se + (offs_n // SCALE_BLOCK_N).to(tl.int64) * stride_sn  # [BN] their scale rows
    up_srows = srows + ((N + SCALE_BLOCK_N - 1) // SCALE_BLOCK_N) * stride_sn  # the up rows' own blocks
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_left = K - k0  # masks the K tail of the last step
        kb = k0 // SCALE_BLOCK_K
        a = tl.load(a_ptr + a_row[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)  # [BM, BK]
        if IS_A16:
            a_scale = tl.full((BLOCK_M,), 1.0, tl.float32)  # not read
        else:
            a_scale = tl.load(a_scale_ptr + a_row * stride_asm + kb, mask=mask_m, other=0.0)  # [BM]
        acc = _fp8_block_step(acc, a, a_scale, w_ptr, ws_ptr, rows, srows, k0, offs_k, k_left, mask_n, kb, IS_A16)
        if GATED:
            acc_u = _fp8_block_step(acc_u, a, a_scale, w_ptr, ws_ptr, up_rows, up_srows, k0, offs_k, k_left, mask_n,
                                    kb, IS_A16)

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled
        gdc_launch_dependents()
    _moe_epilogue(acc, acc_u, w_ptr, rw_ptr, out_ptr, expert, slots, mask_m, offs_n, mask_n, N, 0, stride_om,
                  alpha, limit, GATED, ACT, False)
