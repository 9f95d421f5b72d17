"""MXFP4 expert kernels of the fused MoE (`rdnac.kernels.moe`) other than the W4A16 grouped GEMM.

Decode (a config with GEMV): `_moe_gemv_mxfp4_kernel`, a grouped GEMV over the same expert-sorted
blocks as `moe_gemm._moe_gemm_kernel` (BLOCK_M rows of one expert per program, padding rows hold the
sentinel) with no matrix instruction: at batch 1 an expert has one row, and tl.dot's 16-row tile, the
layout change of the decoded tile through shared memory and a scale gathered per element made the
W4A16 GEMM compute-bound at a sixth of the copy bandwidth. Per K step a program loads BLOCK_N rows x
BLOCK_K/8 int32 words (8 codes each, 64-512 bytes contiguous per row) as BLOCK_K/32 scale groups of 4
words, and one scale byte per group; it decodes the 8 nibbles of each word into a float32's bits,
multiplies-adds them with x into a per-group partial, and applies the group's scale once to the
partial (a [BLOCK_M, BLOCK_N, BLOCK_K/32] float32 accumulator, reduced once after the loop).

The decode is exact: nibble c (sign bit 3, magnitude bits 0..2 = exponent e, mantissa m) goes to
sign << 31 | (c & 7) << 22, the float32 2**-126 * e2m1(c) (e = 0: the subnormal m * 2**-127, the
e2m1 subnormal 0.5 as the same linear map), then * 2**126, an exact power-of-two product: 3 integer
operations, a multiply and the FMA per element (the first kernel spent 5 integer and 3 float ones and
loaded a scale per word; measured on an H100 at GPT-OSS-20B's shapes, batch 1: 25.7% of copy).

Prefill (a config with DEQUANT): `_mxfp4_dequant_kernel` writes a projection's experts as x's dtype
once into a scratch, and the dense grouped GEMM runs over it: the in-loop decode was redone for every
row tile (7.8 ms against dense bf16's 1.2 ms for GPT-OSS-20B at 2048 tokens on an H100).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.moe_gemm import _moe_epilogue, e2m1_to_float, e8m0_to_float, expert_block

AOT_DIVISIBLE = {"_moe_gemv_mxfp4_kernel": ("N", "K", "stride_am", "stride_we", "stride_wn", "stride_se",
                                            "stride_sn", "stride_be", "stride_om"),
                 "_mxfp4_dequant_kernel": ("K",)}
_SUM = tl.standard._sum_combine  # tl.sum is a jit function the interpreter path cannot call
NIBBLE_BITS = tl.constexpr(-2118123520)  # int32 0x81C00000: float32 sign bit, the two low exponent bits and
#                                         the first mantissa bit (22..24)
TWO_POW_126 = tl.constexpr(8.507059173023462e37)
DEQUANT_BLOCK_R = 16  # rows x
DEQUANT_BLOCK_K = 256  # elements per program of the prefill dequantization


@triton.jit
def _nibble(words, J: tl.constexpr):
    """float32 2**-126 * e2m1 of nibble J (elements 8w + J) of int32 words: the nibble shifted to bits 28..31,
    then an arithmetic shift right by 6 leaves its magnitude at 22..24 and copies its sign through 25..31;
    the mask keeps bit 31 and 22..24 (3 integer operations per element)."""
    if J < 7:
        words = words << (28 - 4 * J)
    return ((words >> 6) & NIBBLE_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_step(acc, a_rows, a_mask, k0, offs_w, words, scale):
    """acc [BM, BN, BS] += scale * sum over its scale group's 4 words w and their 8 nibbles j of
    a[:, k0 + 8w + j] * W[n, k0 + 8w + j]; words [1, BN, BS, 4], scale [1, BN, BS]: the scale multiplies
    once per 32 elements, after the group's products."""
    part = tl.load(a_rows + (k0 + 8 * offs_w), mask=a_mask, other=0).to(tl.float32) * (_nibble(words, 0) *
                                                                                       TWO_POW_126)
    for j in tl.static_range(1, 8):
        a = tl.load(a_rows + (k0 + 8 * offs_w + j), mask=a_mask, other=0).to(tl.float32)  # [BM, 1, BS, 4]
        part += a * (_nibble(words, j) * TWO_POW_126)
    return acc + tl.reduce(part, 3, _SUM) * scale


@triton.jit
def _moe_gemv_mxfp4_kernel(a_ptr, w_ptr, ws_ptr, bias_ptr, rw_ptr, out_ptr, sorted_ptr, block_expert_ptr,
                           num_padded_ptr, num_slots, N, K, stride_am, stride_we, stride_wn, stride_se, stride_sn,
                           stride_be, stride_om, alpha, limit,
                           GATED: tl.constexpr, ROW_DIV: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PDL: tl.constexpr = False):
    # As moe_gemm._moe_gemm_kernel with MXFP4 (same arguments): w bytes [E, rows, K/2], scales [E, rows, K/32].
    # A step is BS = BLOCK_K / 32 scale groups of 4 int32 words per row: tiles [BM, BN, BS, 4].
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):  # past the last expert's blocks: nothing to do
        return
    expert, slots, mask_m, a_row, offs_n, mask_n = expert_block(pid_m, pid_n, block_expert_ptr, sorted_ptr,
                                                                num_slots, N, ROW_DIV, BLOCK_M, BLOCK_N)
    a_rows = (a_ptr + a_row * stride_am)[:, None, None, None]  # [BM, 1, 1, 1]
    # Row starts are whole words: K is a multiple of 32, so a row's K/2 bytes are a multiple of 16.
    rows = (w_ptr + expert * stride_we + offs_n.to(tl.int64) * stride_wn).to(tl.pointer_type(tl.int32))
    rows = rows[None, :, None, None]  # [1, BN, 1, 1] int32 word pointers
    up_rows = rows + N * stride_wn // 4
    srows = (ws_ptr + expert * stride_se + offs_n.to(tl.int64) * stride_sn)[None, :, None]  # [1, BN, 1]
    up_srows = srows + N * stride_sn
    offs_s = tl.arange(0, BLOCK_K // 32)  # [BS] scale groups of the step
    offs_w = (4 * offs_s[:, None] + tl.arange(0, 4)[None, :])[None, None, :, :]  # [1, 1, BS, 4] words
    acc = tl.full((BLOCK_M, BLOCK_N, BLOCK_K // 32), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N, BLOCK_K // 32), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        group = k0 // 32 + offs_s[None, None, :]  # [1, 1, BS]
        s_mask = mask_n[None, :, None] & (group < K // 32)
        word = k0 // 8 + offs_w  # [1, 1, BS, 4]; K is whole groups, so a group is all in or all out
        in_k = word < K // 8
        a_mask = mask_m[:, None, None, None] & in_k
        w_mask = mask_n[None, :, None, None] & in_k
        words = tl.load(rows + word, mask=w_mask, other=0)  # [1, BN, BS, 4]
        scale = e8m0_to_float(tl.load(srows + group, mask=s_mask, other=127).to(tl.int32))  # [1, BN, BS]
        acc = _gemv_step(acc, a_rows, a_mask, k0, offs_w, words, scale)
        if GATED:
            words = tl.load(up_rows + word, mask=w_mask, other=0)
            scale = e8m0_to_float(tl.load(up_srows + group, mask=s_mask, other=127).to(tl.int32))
            acc_u = _gemv_step(acc_u, a_rows, a_mask, k0, offs_w, words, scale)

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled
        gdc_launch_dependents()
    _moe_epilogue(tl.reduce(acc, 2, _SUM), tl.reduce(acc_u, 2, _SUM), bias_ptr, rw_ptr, out_ptr, expert, slots,
                  mask_m, offs_n, mask_n, N, stride_be, stride_om, alpha, limit, GATED, ACT, HAS_BIAS)


@triton.jit
def _mxfp4_dequant_kernel(w_ptr, s_ptr, out_ptr, num_rows, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                          PDL: tl.constexpr = False):
    # w [R, K/2] u8, scales [R, K/32] u8 -> out [R, K] in out's dtype (R = experts x rows, flattened)
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    kh = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # [BK/2] byte index along a row
    r64 = offs_r.to(tl.int64)[:, None]
    mask = (offs_r < num_rows)[:, None] & (kh < K // 2)[None, :]
    packed = tl.load(w_ptr + r64 * (K // 2) + kh[None, :], mask=mask, other=0).to(tl.int32)  # [BR, BK/2]
    scale = e8m0_to_float(tl.load(s_ptr + r64 * (K // 32) + (kh // 16)[None, :], mask=mask, other=127).to(tl.int32))
    dtype = out_ptr.dtype.element_ty
    even = (e2m1_to_float(packed & 15) * scale).to(dtype)
    odd = (e2m1_to_float(packed >> 4) * scale).to(dtype)
    pairs = tl.reshape(tl.join(even, odd), (BLOCK_R, BLOCK_K))  # element 2i then 2i + 1
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + r64 * K + k[None, :], pairs, mask=(offs_r < num_rows)[:, None] & (k < K)[None, :])
