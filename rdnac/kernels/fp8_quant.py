"""FP8 (and int8) activation quantization: the `linear_fp8` / `linear_int8` wrappers' first launch.

x [M, K] -> q [M, K] fp8 and float32 scales: per token (group 0, scale = amax / FP8_MAX, a zero row
gets 1; one program per row, no atomics), per (token, `group` columns) for block-FP8, or one given
static scale. The fused norm/activation + quant kernels (`rms_norm_quant`, `activation_quant`) use
the same rule and `GRID`, so fused and unfused paths write the same bytes.

Rounding matches the reference (`rdnac.ir.fp8.quantize_rows`) bit for bit: scale = amax / FP8_MAX
and x / scale are correctly rounded divisions (`tl.div_rn`: NVIDIA's default fp32 `/` is
approximate), and the value is rounded to the FP8 grid (nearest, ties to even) in fp32 before the
cast, so the cast itself is exact. That step exists because the Triton interpreter's fp32 -> fp8
cast rounds ties away from zero and drops the carry when the mantissa rounds up (124.0 became 64.0
in e4m3fn), and because a cast of an exact value is the same on every backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS, FP8_MAX
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16
AOT_DIVISIBLE = {"_quant_fp8_kernel": ("K", "stride_xm", "stride_qm")}

# Per format: (smallest normal, 2**23 * the subnormal spacing: adding and subtracting it rounds a
# subnormal to the FP8 grid). e4m3fn: bias 7, normals from 2**-6, spacing 2**-9; fnuz: bias 8.
# int8 (W8A8) is all "subnormal": no normal above its max of 127, spacing 1, so adding and subtracting 2**23
# rounds |x / scale| <= 127 to the nearest integer, ties to even (rdnac.ir.fp8.to_format), and the cast is exact.
GRID = {"e4m3fn": (2.0 ** -6, 2.0 ** 14), "e4m3fnuz": (2.0 ** -7, 2.0 ** 13), "int8": (128.0, 2.0 ** 23)}
_MAX = tl.standard._elementwise_max  # tl.max is a jit function: the interpreter path cannot call it
QUANT_STEP = 1024  # a row is read in tiles of this many elements (2048 spills SGPRs on gfx1201)


@triton.jit
def fp8_scale(amax, FP8_MAX: tl.constexpr):
    """The scale of a row or group whose largest magnitude is `amax`: amax / FP8_MAX, correctly rounded
    (NVIDIA's default fp32 `/` is approximate); a zero row or group gets 1, not 0/0."""
    return tl.where(amax > 0, tl.div_rn(amax, FP8_MAX), 1.0)


@triton.jit
def round_to_fp8_grid(v, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr, SUBNORMAL_ROUNDER: tl.constexpr):
    """v (fp32, x / scale) clamped to +-FP8_MAX and rounded to the FP8 grid in fp32, ties to even:
    normals keep 3 mantissa bits (a carry into the exponent is the right result), subnormals snap to the
    fixed spacing (`GRID`). No -0: its bits are NaN in e4m3fnuz. Every kernel that quantizes to FP8 ends
    here (and takes its scales from `fp8_scale`), so all of them give `rdnac.ir.fp8.quantize_rows`'s bits."""
    v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    mag = tl.abs(v)
    bits = mag.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    subnormal = (mag + SUBNORMAL_ROUNDER) - SUBNORMAL_ROUNDER
    mag = tl.where(mag < MIN_NORMAL, subnormal, normal)
    return tl.where((v < 0) & (mag > 0), -mag, mag)


@triton.jit
def _quant_fp8_kernel(x_ptr, in_scale_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, stride_sm,
                      GROUP: tl.constexpr, IS_STATIC: tl.constexpr, FP8_MAX: tl.constexpr,
                      MIN_NORMAL: tl.constexpr, SUBNORMAL_ROUNDER: tl.constexpr,
                      GROUPS_PER_STEP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # x: [M, K] -> q: [M, K] fp8, scale: [M, G] fp32, G = cdiv(K, GROUP) (GROUP 0: one scale per row;
    # IS_STATIC: the given [1] scale, nothing written). One program per row, no atomics. Each step
    # covers a [GROUPS_PER_STEP, BLOCK] tile: whole groups (BLOCK >= GROUP), or BLOCK columns per row.
    row = tl.program_id(0).to(tl.int64)
    chunk: tl.constexpr = GROUP if GROUP > 0 else BLOCK  # columns per tile row
    step: tl.constexpr = GROUPS_PER_STEP * chunk
    offs_g = tl.arange(0, GROUPS_PER_STEP)  # [GS]
    offs_c = tl.arange(0, BLOCK)  # [B]
    tile = offs_g[:, None] * chunk + offs_c[None, :]  # [GS, B] column offsets within a step
    in_chunk = offs_c[None, :] < chunk
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if IS_STATIC:
        scale = tl.load(in_scale_ptr).to(tl.float32)
    elif GROUP == 0:  # per token: the row's amax first, then a second pass quantizes
        amax = tl.full((GROUPS_PER_STEP, BLOCK), 0.0, tl.float32)
        for k0 in range(0, K, step):
            xk = tl.load(x_row + k0 + tile, mask=in_chunk & (k0 + tile < K), other=0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(xk))
        amax_row = tl.reduce(tl.reduce(amax, 1, _MAX), 0, _MAX)
        scale = fp8_scale(amax_row, FP8_MAX)  # a zero row: 1, not 0/0
        tl.store(scale_ptr + row * stride_sm, scale)
    for k0 in range(0, K, step):
        mask = in_chunk & (k0 + tile < K)
        xk = tl.load(x_row + k0 + tile, mask=mask, other=0).to(tl.float32)  # [GS, B]
        if GROUP > 0 and not IS_STATIC:  # whole groups in this tile: one pass
            amax_group = tl.reduce(tl.abs(xk), 1, _MAX)  # [GS]
            group_scale = fp8_scale(amax_group, FP8_MAX)
            groups = k0 // GROUP + offs_g
            tl.store(scale_ptr + row * stride_sm + groups, group_scale, mask=groups * GROUP < K)
            v = tl.div_rn(xk, group_scale[:, None])
        else:
            v = tl.div_rn(xk, scale)
        q = round_to_fp8_grid(v, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)
        tl.store(q_row + k0 + tile, q.to(q_ptr.dtype.element_ty), mask=mask)



def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None, fmt: str, group: int, *,
                         launcher: Launcher) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] fp8, scales) for act_scheme dynamic_token (group 0), dynamic_group or static."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=FORMATS[fmt], device=x.device)  # [M, K]
    is_static = input_scale is not None
    num_groups = 1 if group == 0 else cdiv(K, group)
    scale = input_scale if is_static else torch.empty((M, num_groups), dtype=torch.float32, device=x.device)
    if group:  # whole groups per step, about QUANT_STEP columns
        block = next_power_of_2(group)
        groups_per_step = min(max(1, QUANT_STEP // block), next_power_of_2(num_groups))
    else:
        block, groups_per_step = min(next_power_of_2(K), QUANT_STEP), 1
    min_normal, rounder = GRID[fmt]
    launcher.launch(_quant_fp8_kernel, (M,),
                    (x, scale, q, scale, K, x.stride(0), q.stride(0), num_groups),
                    constexprs=dict(GROUP=group, IS_STATIC=is_static, FP8_MAX=FP8_MAX[fmt], MIN_NORMAL=min_normal,
                                    SUBNORMAL_ROUNDER=rounder, GROUPS_PER_STEP=groups_per_step, BLOCK=block),
                    num_warps=4, num_stages=1)
    return q, scale
