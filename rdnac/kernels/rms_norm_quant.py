"""RMSNorm with FP8 activation quantization fused in: implements the IR op `rms_norm_quant`.

Writes what `rms_norm` followed by the `linear_fp8` wrapper's `_quant_fp8_kernel`
would, in one launch and without the bf16 round trip: the fp8 values [T, H],
their float32 scales ([T, 1] per token, or [T, cdiv(H, GROUP)] per token and
GROUP columns), and the residual sum when there is a residual.

Bit for bit the unfused kernels' output: the residual sum, the float32 sum of
squares (same [1, BLOCK_H] tiles reduced the same way as `_rms_norm_kernel`),
the normalized value rounded to the activation dtype, `w * y` rounded to the
dtype `rms_norm` would write (Y_DTYPE), then `_quant_fp8_kernel`'s rule:
scale = amax / FP8_MAX (correctly rounded), y / scale rounded to the FP8 grid
in fp32 (ties to even, no -0) before an exact cast.

One program per token. With BLOCK_H >= H the row is read once; otherwise pass
1 sums squares (and stores the residual sum), pass 2 recomputes y from the
inputs and takes the row amax (per token) or quantizes whole groups, and per
token a pass 3 quantizes. GROUP must be a power of two that divides BLOCK_H.
With CHUNK > 0 (group scales, BLOCK_H >= H) the grid is (T, cdiv(H, CHUNK)):
every program sums the squares of the whole row (the same one-tile reduction,
so the same bits) and normalizes and quantizes its CHUNK columns, loaded
straight into the [groups, GROUP] layout. At decode sizes this replaces one
program's dependent passes over the row with parallel ones.

Config space: BLOCK_H (power of two, >= GROUP), CHUNK (0, or whole groups
with a one-tile row), num_warps.
Problem keys: {"H", "group", "dtype", "M" (tokens of the step; picks CHUNK)}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS, FP8_MAX
from rdnac.kernels.fp8_quant import GRID, fp8_scale, round_to_fp8_grid
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2
from rdnac.kernels.rms_norm import _warps_for

AOT_DIVISIBLE = {"_rms_norm_quant_kernel": ("stride_x_row", "stride_residual_row")}

# tl.sum/tl.max are @triton.jit functions, which the interpreter path cannot call (see rms_norm.py)
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _rms_norm_quant_kernel(x_ptr, residual_ptr, weight_ptr, q_ptr, scale_ptr, residual_out_ptr,
                           stride_x_row, stride_residual_row, eps,
                           H: tl.constexpr, GROUP: tl.constexpr, Y_DTYPE: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, FP8_MAX: tl.constexpr,
                           MIN_NORMAL: tl.constexpr, SUBNORMAL_ROUNDER: tl.constexpr, BLOCK_H: tl.constexpr,
                           CHUNK: tl.constexpr = 0, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # x, residual: [T, H] -> q: [T, H] fp8, scale: [T, G] fp32, residual_out: [T, H] (outputs contiguous)
    act_dtype = x_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + token * stride_x_row
    residual_row = residual_ptr + token * stride_residual_row
    cols = tl.arange(0, BLOCK_H)[None, :]  # [1, BLOCK_H], as _rms_norm_kernel's one-head tiles
    num_groups: tl.constexpr = (H + GROUP - 1) // GROUP if GROUP > 0 else 1
    groups_per_tile: tl.constexpr = BLOCK_H // GROUP if GROUP > 0 else 1

    if CHUNK > 0:  # program (token, chunk): the row's sum of squares, then CHUNK columns of whole groups
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0)  # BLOCK_H >= H: the whole row, one tile
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(residual_row + cols, mask=mask, other=0.0)).to(act_dtype)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.reduce(xf * xf, 1, _SUM) / H + eps)  # [1]
        groups = tl.program_id(1) * (CHUNK // GROUP) + tl.arange(0, CHUNK // GROUP)  # [CHUNK // GROUP]
        offs = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [CHUNK // GROUP, GROUP]: no reshape
        in_row = offs < H
        xn = tl.load(x_row + offs, mask=in_row, other=0.0)  # this chunk again (cached), in the group layout
        if HAS_RESIDUAL:
            xn = (xn.to(tl.float32) + tl.load(residual_row + offs, mask=in_row, other=0.0)).to(act_dtype)
            tl.store(residual_out_ptr + token * H + offs, xn, mask=in_row)
        if UNIT_OFFSET:  # Gemma: the product in float32, rounded once
            w = tl.load(weight_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            y = ((xn.to(tl.float32) * rstd[:, None]) * (1.0 + w)).to(Y_DTYPE).to(tl.float32)
        else:
            y = (xn.to(tl.float32) * rstd[:, None]).to(act_dtype).to(tl.float32)
            w = tl.load(weight_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
            y = (w * y).to(Y_DTYPE).to(tl.float32)
        group_amax = tl.reduce(tl.abs(y), 1, _MAX)  # [CHUNK // GROUP]
        group_scale = fp8_scale(group_amax, FP8_MAX)
        tl.store(scale_ptr + token * num_groups + groups, group_scale, mask=groups < num_groups)
        v = tl.div_rn(y, group_scale[:, None])
        q = round_to_fp8_grid(v, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)  # see fp8_quant
        tl.store(q_ptr + token * H + offs, q.to(q_ptr.dtype.element_ty), mask=in_row)
    else:  # program per token: the row in one tile, or looped over in passes
        # pass 1: sum of squares, and the residual sum (stored once)
        if BLOCK_H >= H:
            mask = cols < H
            x = tl.load(x_row + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + tl.load(residual_row + cols, mask=mask, other=0.0)).to(act_dtype)
                tl.store(residual_out_ptr + token * H + cols, x, mask=mask)
            xf = x.to(tl.float32)
            sum_sq = xf * xf
        else:
            sum_sq = tl.full([1, BLOCK_H], 0.0, tl.float32)
            for start in range(0, H, BLOCK_H):
                mask = start + cols < H
                x = tl.load(x_row + start + cols, mask=mask, other=0.0)
                if HAS_RESIDUAL:
                    x = (x.to(tl.float32) + tl.load(residual_row + start + cols, mask=mask, other=0.0)).to(act_dtype)
                    tl.store(residual_out_ptr + token * H + start + cols, x, mask=mask)
                xf = x.to(tl.float32)
                sum_sq += xf * xf
        rstd = tl.math.rsqrt(tl.reduce(sum_sq, 1, _SUM) / H + eps)  # [1]

        # pass 2 (per token, looping only): the row amax; then quantize (_quant_fp8_kernel's rule)
        num_passes: tl.constexpr = 1 if GROUP > 0 or BLOCK_H >= H else 2
        amax = tl.full([1, BLOCK_H], 0.0, tl.float32)
        for quant_pass in tl.static_range(num_passes):
            if quant_pass == 1:
                row_amax = tl.reduce(tl.reduce(amax, 1, _MAX), 0, _MAX)
                scale = fp8_scale(row_amax, FP8_MAX)  # a zero row: 1, not 0/0
                tl.store(scale_ptr + token, scale)
            for start in range(0, H, BLOCK_H):
                offs = start + cols  # [1, BLOCK_H]
                in_row = offs < H
                if BLOCK_H >= H:  # the one tile read in pass 1
                    xn = x.to(tl.float32)
                elif HAS_RESIDUAL:  # recomputed from the inputs: residual_out was written without a barrier
                    xn = (tl.load(x_row + offs, mask=in_row, other=0.0).to(tl.float32)
                          + tl.load(residual_row + offs, mask=in_row, other=0.0)).to(act_dtype).to(tl.float32)
                else:
                    xn = tl.load(x_row + offs, mask=in_row, other=0.0).to(tl.float32)
                if UNIT_OFFSET:
                    w = tl.load(weight_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
                    y = (xn * rstd[:, None]) * (1.0 + w)
                else:
                    y = (xn * rstd[:, None]).to(act_dtype).to(tl.float32)
                    w = tl.load(weight_ptr + offs, mask=in_row, other=0.0).to(tl.float32)
                    y = w * y
                y = y.to(Y_DTYPE).to(tl.float32)  # [1, BLOCK_H]: what rms_norm writes, back in fp32
                if GROUP > 0:  # whole groups per tile: one scale per row of the [groups, GROUP] view
                    y = tl.reshape(y, [groups_per_tile, GROUP])
                    offs = tl.reshape(offs, [groups_per_tile, GROUP])
                    in_row = offs < H
                    group_amax = tl.reduce(tl.abs(y), 1, _MAX)  # [groups_per_tile]
                    group_scale = fp8_scale(group_amax, FP8_MAX)
                    groups = start // GROUP + tl.arange(0, groups_per_tile)
                    tl.store(scale_ptr + token * num_groups + groups, group_scale, mask=groups < num_groups)
                    v = tl.div_rn(y, group_scale[:, None])
                elif quant_pass + 1 < num_passes:
                    amax = tl.maximum(amax, tl.abs(y))
                else:
                    if num_passes == 1:  # the one tile holds the row
                        row_amax = tl.reduce(tl.reduce(tl.abs(y), 1, _MAX), 0, _MAX)
                        scale = fp8_scale(row_amax, FP8_MAX)
                        tl.store(scale_ptr + token, scale)
                    v = tl.div_rn(y, scale)
                if quant_pass + 1 == num_passes:
                    q = round_to_fp8_grid(v, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)  # see fp8_quant
                    tl.store(q_ptr + token * H + offs, q.to(q_ptr.dtype.element_ty), mask=in_row)


def rms_norm_quant(x: torch.Tensor, *rest: torch.Tensor, eps: float, unit_offset: bool = False,
                   fp8_format: str, group: int = 0, config: dict, launcher: Launcher):
    """x [T, H], (residual [T, H]), weight [H] -> q [T, H] fp8, scale [T, G] float32 (G = 1 or
    cdiv(H, group)), and x + residual [T, H] with a residual."""
    residual, weight = (rest[0] if len(rest) == 2 else None), rest[-1]
    num_tokens, H = x.shape
    assert x.stride(1) == 1 and weight.is_contiguous(), "rms_norm_quant needs unit stride along H"
    assert group == 0 or group & (group - 1) == 0, f"rms_norm_quant requires a power-of-two group; got {group}"
    # the dtype rms_norm would write (see rms_norm._launch): y is rounded to it before quantization
    y_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    num_groups = cdiv(H, group) if group else 1
    q = torch.empty((num_tokens, H), dtype=FORMATS[fp8_format], device=x.device)  # [T, H]
    scale = torch.empty((num_tokens, num_groups), dtype=torch.float32, device=x.device)  # [T, G]
    residual_out = None
    if residual is not None:
        assert residual.dtype == x.dtype and residual.stride(1) == 1, "residual must match x's dtype"
        residual_out = torch.empty((num_tokens, H), dtype=x.dtype, device=x.device)  # [T, H]
    if num_tokens > 0:
        block_h, chunk = config["constexprs"]["BLOCK_H"], config["constexprs"].get("CHUNK", 0)
        assert block_h >= group, f"rms_norm_quant: BLOCK_H {block_h} must hold whole groups of {group}"
        assert not chunk or (group and chunk % group == 0 and block_h >= H), \
            f"rms_norm_quant: CHUNK {chunk} needs group scales ({group}) dividing it and BLOCK_H {block_h} >= H {H}"
        min_normal, rounder = GRID[fp8_format]
        launcher.launch(_rms_norm_quant_kernel, (num_tokens, cdiv(H, chunk) if chunk else 1),
                        (x, residual if residual is not None else x, weight, q, scale,
                         residual_out if residual_out is not None else q,
                         x.stride(0), residual.stride(0) if residual is not None else 0, float(eps)),
                        constexprs={"H": H, "GROUP": group, "Y_DTYPE": _TL_DTYPES[y_dtype],
                                    "HAS_RESIDUAL": residual is not None, "UNIT_OFFSET": bool(unit_offset),
                                    "FP8_MAX": FP8_MAX[fp8_format], "MIN_NORMAL": min_normal,
                                    "SUBNORMAL_ROUNDER": rounder, "BLOCK_H": block_h, "CHUNK": chunk},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return (q, scale) if residual_out is None else (q, scale, residual_out)



def config_space(problem: dict) -> list[dict]:
    """Candidates for {"H", "group"}: BLOCK_H covering H or looping over it, always whole groups; with
    group scales and a row of at most 8192, also CHUNK columns per program over a one-tile row."""
    group = problem.get("group", 0)
    whole = max(next_power_of_2(problem["H"]), group)
    block_hs = sorted({whole} | {b for b in (256, 512, 1024, 2048, 4096) if group <= b < whole})
    space = [{"constexprs": {"BLOCK_H": b}, "num_warps": w, "num_stages": 1} for b in block_hs for w in _warps_for(b)]
    if group and whole <= 8192:
        space += [{"constexprs": {"BLOCK_H": whole, "CHUNK": c}, "num_warps": w, "num_stages": 1}
                  for c in (256, 512, 1024, 2048) if group <= c < whole for w in (2, 4, 8)]
    return space


# Measured on an H100 (bench/norm_quant.py at 1345601, H 4096, 2048 tokens): with group scales, whole-row tiles
# slow down with the number of groups they hold (BLOCK_H 1024: 37 us, 2048: 102 us, 4096: 174 us; the
# unfused norm + quant pair takes 39 us), so group tiles stop at 1024 columns and loop over the row.
GROUP_TILE_MAX = 1024


# With group scales, rows of up to 8192 split over programs of CHUNK columns, narrower at decode sizes
# (M <= 64 tokens). H100, H 4096 (bench/small_kernels.py at 1345601): 1 token 2.56 us with CHUNK 512 and 8 warps,
# against 5.35 for the best program-per-token config (rms_norm alone: 2.0); 2048 tokens 34.4 us with
# CHUNK 2048 against 37.2.
DECODE_TOKENS = 64
CHUNK = {"decode": 512, "prefill": 2048}


def default_config(problem: dict) -> dict:
    group = problem.get("group", 0)
    whole = max(next_power_of_2(problem["H"]), group)
    chunk = max(group, min(CHUNK["decode" if problem.get("M", 1 << 30) <= DECODE_TOKENS else "prefill"], whole // 2))
    if group and chunk < whole <= 8192:
        return {"constexprs": {"BLOCK_H": whole, "CHUNK": chunk}, "num_warps": 8, "num_stages": 1}
    # Per-token scales: as rms_norm's BLOCK_H (the same tiles give the same sum of squares as the
    # unfused norm), 8 warps for a one-tile row of 4096+ (H100, H 4096: 3.4 vs 4.1 us at 1 token, 25 vs
    # 27 us at 2048).
    block_h = whole if whole <= 8192 else 4096
    if group:
        block_h = min(block_h, max(GROUP_TILE_MAX, group))
    one_tile = block_h >= problem["H"]  # the looping path at 4096 x 8 warps spills on gfx1201
    warps = 8 if block_h >= 4096 and one_tile else 4 if block_h >= 1024 else 2 if block_h >= 512 else 1
    return {"constexprs": {"BLOCK_H": block_h}, "num_warps": warps, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


FAMILY = KernelFamily(
    "rms_norm_quant", config_space=config_space, default_config=default_config,
    ops={"rms_norm_quant": OpKernel(rms_norm_quant, lambda a, ins, phase, runtime: {
        "H": ins[0].shape[1], "group": a["group"], "dtype": dtype_name(ins[0]), "M": ins[0].shape[0]})})
