"""The grouped GEMM of the fused MoE (`rdnac.kernels.moe`), both projections, dense or MXFP4 weights.

A program owns BLOCK_M rows of the expert-sorted slot list (`moe._moe_align_kernel`: each block of
BLOCK_M rows belongs to one expert, padding rows hold the sentinel `num_slots`) and BLOCK_N output
columns. Row r of a block is routed slot s = sorted[r] (token s // TOP_K, its choice s % TOP_K):

- GATED (gate/up): A rows are x[s // TOP_K] [K = H]; w13[e] [2N, H] gives gate rows n and up rows N + n
  (two accumulators, one A tile); the epilogue adds b13[e], applies the activation in float32 and
  stores act(gate) * up to out[s] ([T*k, N = I], x's dtype).
- not GATED (down): A rows are inter[s] [K = I]; w2[e] [N = H, I]; the epilogue adds b2[e], multiplies
  by the routing weight of slot s and stores out[s] float32 ([T*k, H]); `moe._moe_sum_kernel` then adds
  each token's k rows in slot order (deterministic: no atomics).

Programs whose block starts past the padded total (read from the device; the grid is the shape-only
bound) return at once, so one grid serves every routing and steps capture into CUDA graphs.

MXFP4 (W4A16): the weight is blocks u8 [E, rows, K/2] (element 2i the low nibble of byte i) and e8m0
scales u8 [E, rows, K/32], read as stored (no re-layout: a row's bytes are already K-contiguous, the
B operand's K-major order). Each K step loads [BLOCK_K/2, BLOCK_N] bytes, decodes the even (low) and
odd (high) elements to two half tiles, and multiplies them with the even and odd columns of the A
tile (two strided loads). e2m1 values and the scale 2**(s - 127) are built from their bits (the scale
byte goes into a float32's exponent field, never through a float conversion of its value).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.activation import activate

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_moe_gemm_kernel": ("N", "K", "stride_am", "stride_we", "stride_wn", "stride_se", "stride_sn",
                                      "stride_be", "stride_om"),
                 "_moe_epilogue": ("stride_be", "stride_om")}  # a jit helper: the calling kernel's strides


@triton.jit
def e2m1_to_float(nibble):
    """float32 value of e2m1 codes (int32 in [0, 16)): sign bit 8, exponent bits 4..2, mantissa bit 1;
    magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. Built from the bits of a float32 (no table)."""
    mag = nibble & 7
    normal = (((mag >> 1) + 126) << 23) | ((mag & 1) << 22)  # 2**(e - 1) * (1 + m / 2) for e >= 1
    bits = tl.where(mag >= 2, normal, tl.where(mag == 1, 0x3F000000, 0))  # code 1: 0.5 (subnormal in e2m1)
    return (bits | ((nibble & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_to_float(scale):
    """2**(s - 127) of e8m0 scale bytes (int32 in [0, 255)): s is the float32 exponent field as it stands;
    s = 0 (2**-127) is the float32 subnormal 0x00400000."""
    return tl.where(scale == 0, 0x00400000, scale << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_half_tiles(w_ptr, s_ptr, rows, srows, k0, offs_kh, mask_n, K, DTYPE: tl.constexpr):
    """The even-K and odd-K halves [BK/2, BN] of the weight tile at k0, in DTYPE: bytes at w_ptr + rows[n]
    + k0/2 + i hold elements k0 + 2i (low nibble) and k0 + 2i + 1 (high); byte i's scale is at s_ptr +
    srows[n] + (k0/2 + i) // 16."""
    kh = k0 // 2 + offs_kh  # [BK/2] byte index along the row
    mask = (kh < K // 2)[:, None] & mask_n[None, :]
    packed = tl.load(w_ptr + rows[None, :] + kh[:, None], mask=mask, other=0).to(tl.int32)  # [BK/2, BN]
    scale = e8m0_to_float(tl.load(s_ptr + srows[None, :] + (kh // 16)[:, None], mask=mask, other=127).to(tl.int32))
    even = (e2m1_to_float(packed & 15) * scale).to(DTYPE)
    odd = (e2m1_to_float(packed >> 4) * scale).to(DTYPE)
    return even, odd


@triton.jit
def expert_block(pid_m, pid_n, block_expert_ptr, sorted_ptr, num_slots, N, ROW_DIV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (pid_m, pid_n)'s share of the grouped MoE GEMMs (moe_gemm, moe_fp8, moe_gemv): its expert
    (int64; one per BLOCK_M block of the sorted slots), its slots [BM] (padding rows hold num_slots) with
    their mask, the activation row of each slot ((slots // ROW_DIV), int64: x's token, or the slot itself),
    and its output columns offs_n [BN] with their mask. The caller returns early for blocks past the
    padded total (a helper cannot)."""
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    slots = tl.load(sorted_ptr + offs_m)  # [BM]; padding rows hold num_slots
    a_row = (slots // ROW_DIV).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    return expert, slots, slots < num_slots, a_row, offs_n, offs_n < N


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, ws_ptr, bias_ptr, rw_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                     num_slots, N, K, stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_be, stride_om,
                     alpha, limit,
                     GATED: tl.constexpr, ROW_DIV: tl.constexpr, ACT: tl.constexpr, MXFP4: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr = False):
    # a: [*, K], row s // ROW_DIV for slot s; w: [E, N (x2 if GATED), K] or MXFP4 bytes [E, rows, K/2] with
    # scales ws [E, rows, K/32]; bias [E, N (x2)]; rw: routing weights [num_slots] f32 (not GATED);
    # out: [num_slots, N]. Weight offsets are in elements (bytes for MXFP4), int64.
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):  # past the last expert's blocks: nothing to do
        return
    expert, slots, mask_m, a_row, offs_n, mask_n = expert_block(pid_m, pid_n, block_expert_ptr, sorted_ptr,
                                                                num_slots, N, ROW_DIV, BLOCK_M, BLOCK_N)
    a_rows = a_ptr + a_row * stride_am  # [BM] row pointers
    rows = expert * stride_we + offs_n.to(tl.int64) * stride_wn  # [BN] gate (or only) weight rows
    up_rows = rows + N * stride_wn  # [BN] the matching up rows (GATED)
    srows = expert * stride_se + offs_n.to(tl.int64) * stride_sn  # [BN] their scale rows (MXFP4)
    up_srows = srows + N * stride_sn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a jit function
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if MXFP4:
        offs_kh = tl.arange(0, BLOCK_K // 2)  # [BK/2]
        for k0 in range(0, K, BLOCK_K):
            k_even = k0 + 2 * offs_kh  # [BK/2]; K is a multiple of 32, so k_even < K means k_even + 1 < K
            a_mask = mask_m[:, None] & (k_even < K)[None, :]
            # other=0, not 0.0: the interpreter converts a float `other` to bf16 bit by bit on every load.
            a_even = tl.load(a_rows[:, None] + k_even[None, :], mask=a_mask, other=0)  # [BM, BK/2]
            a_odd = tl.load(a_rows[:, None] + (k_even + 1)[None, :], mask=a_mask, other=0)
            even, odd = _mxfp4_half_tiles(w_ptr, ws_ptr, rows, srows, k0, offs_kh, mask_n, K, a_even.dtype)
            acc = tl.dot(a_even, even, acc, input_precision="ieee")
            acc = tl.dot(a_odd, odd, acc, input_precision="ieee")
            if GATED:
                even, odd = _mxfp4_half_tiles(w_ptr, ws_ptr, up_rows, up_srows, k0, offs_kh, mask_n, K,
                                              a_even.dtype)
                acc_u = tl.dot(a_even, even, acc_u, input_precision="ieee")
                acc_u = tl.dot(a_odd, odd, acc_u, input_precision="ieee")
    else:
        offs_k = tl.arange(0, BLOCK_K)  # [BK]
        for k0 in range(0, K, BLOCK_K):
            k_left = K - k0  # masks the K tail of the last step
            a = tl.load(a_rows[:, None] + (k0 + offs_k)[None, :], mask=mask_m[:, None] & (offs_k[None, :] < k_left),
                        other=0)  # [BM, BK]
            b_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
            b = tl.load(w_ptr + rows[None, :] + (k0 + offs_k)[:, None], mask=b_mask, other=0)  # [BK, BN]
            acc = tl.dot(a, b, acc, input_precision="ieee")  # ieee: no tf32 for fp32 inputs
            if GATED:
                b = tl.load(w_ptr + up_rows[None, :] + (k0 + offs_k)[:, None], mask=b_mask, other=0)
                acc_u = tl.dot(a, b, acc_u, input_precision="ieee")

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (as gemm._gemm_kernel does)
        gdc_launch_dependents()
    _moe_epilogue(acc, acc_u, bias_ptr, rw_ptr, out_ptr, expert, slots, mask_m, offs_n, mask_n, N, stride_be,
                  stride_om, alpha, limit, GATED, ACT, HAS_BIAS)


@triton.jit
def _moe_epilogue(acc, acc_u, bias_ptr, rw_ptr, out_ptr, expert, slots, mask_m, offs_n, mask_n, N, stride_be,
                  stride_om, alpha, limit, GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc (and acc_u, GATED) [BM, BN] float32 of the rows `slots` -> out (the grouped GEMM and the GEMV)."""
    bias_row = bias_ptr + expert * stride_be
    if HAS_BIAS:
        acc += tl.load(bias_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if GATED:
        if HAS_BIAS:
            acc_u += tl.load(bias_row + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACT == "swiglu_oai":  # GPT-OSS: clamped gate and up, gate * sigmoid(alpha * gate) * (up + 1)
            gate = tl.minimum(acc, limit)
            up = tl.minimum(tl.maximum(acc_u, -limit), limit)
            h = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
        else:
            h = activate(acc, ACT) * acc_u
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        routing = tl.load(rw_ptr + slots, mask=mask_m, other=0.0)  # [BM] f32
        tl.store(out_ptrs, acc * routing[:, None], mask=out_mask)
