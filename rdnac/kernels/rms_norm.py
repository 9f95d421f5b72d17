"""RMSNorm: implements the IR ops `rms_norm` (optionally fused with the residual add,
optionally with Gemma's `1 + w` weight) and `head_rms_norm` (per-head q/k norm).

One kernel serves both: a program normalizes BLOCK_HEADS rows of length H
belonging to one token (rms_norm is the case num_heads = 1, H = hidden).
Rounding follows the reference exactly: the residual sum is rounded to the
activation dtype (it is also an output), the statistic is float32, the
normalized value is rounded to the activation dtype before the weight
product; with `1 + w` (Gemma) the product is float32, rounded once.

Config space: BLOCK_H (a power of two; covering H gives one pass over the
row, a smaller tile loops twice over H: sum of squares, then normalize),
BLOCK_HEADS (rows per program; 1 for rms_norm), num_warps.
Problem keys: {"H": normalized length, "num_heads": rows per token (1 for
rms_norm), "dtype": activation dtype}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_rms_norm_kernel": ("stride_x_row", "stride_residual_row")}

# tl.sum/tl.max/tl.min/tl.zeros/tl.cdiv are @triton.jit functions, which the interpreter path
# cannot call; tl.reduce with the standard combine functions is what they lower to.
_SUM = tl.standard._sum_combine


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     num_heads, stride_x_row, stride_residual_row, eps,
                     H: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    act_dtype = x_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # [BLOCK_HEADS]
    head_mask = heads[:, None] < num_heads  # [BLOCK_HEADS, 1]
    x_rows = x_ptr + token * stride_x_row + heads[:, None] * H
    residual_rows = residual_ptr + token * stride_residual_row + heads[:, None] * H
    # outputs are allocated contiguous: [T, num_heads * H]
    out_offsets = token * num_heads * H + heads[:, None] * H
    cols = tl.arange(0, BLOCK_H)  # [BLOCK_H]

    if BLOCK_H >= H:
        # the whole row fits one tile: one read of x (and residual)
        mask = head_mask & (cols[None, :] < H)
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)  # [BLOCK_HEADS, BLOCK_H]
        if HAS_RESIDUAL:
            summed = (x.to(tl.float32) + tl.load(residual_rows + cols[None, :], mask=mask, other=0.0)).to(act_dtype)
            tl.store(residual_out_ptr + out_offsets + cols[None, :], summed, mask=mask)
            x = summed
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.reduce(xf * xf, 1, _SUM) / H + eps)  # [BLOCK_HEADS]
        if UNIT_OFFSET:  # Gemma: the product in float32, rounded once
            w = tl.load(weight_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)  # [BLOCK_H]
            y = (xf * rstd[:, None]) * (1.0 + w[None, :])
        else:
            y = (xf * rstd[:, None]).to(act_dtype).to(tl.float32)
            w = tl.load(weight_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)  # [BLOCK_H]
            y = w[None, :] * y
        tl.store(out_ptr + out_offsets + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # pass 1: sum of squares (and the residual sum, stored once)
        sum_sq = tl.full([BLOCK_HEADS, BLOCK_H], 0.0, tl.float32)
        for start in range(0, H, BLOCK_H):
            c = start + cols
            mask = head_mask & (c[None, :] < H)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + tl.load(residual_rows + c[None, :], mask=mask, other=0.0)).to(act_dtype)
                tl.store(residual_out_ptr + out_offsets + c[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            sum_sq += xf * xf
        rstd = tl.math.rsqrt(tl.reduce(sum_sq, 1, _SUM) / H + eps)  # [BLOCK_HEADS]
        # pass 2: recompute the rounded sum from the inputs rather than reading back
        # residual_out, which other threads of this program wrote without a barrier
        for start in range(0, H, BLOCK_H):
            c = start + cols
            mask = head_mask & (c[None, :] < H)
            x = tl.load(x_rows + c[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                x = (x.to(tl.float32) + tl.load(residual_rows + c[None, :], mask=mask, other=0.0)).to(act_dtype)
            if UNIT_OFFSET:
                w = tl.load(weight_ptr + c, mask=c < H, other=0.0).to(tl.float32)
                y = (x.to(tl.float32) * rstd[:, None]) * (1.0 + w[None, :])
            else:
                y = (x.to(tl.float32) * rstd[:, None]).to(act_dtype).to(tl.float32)
                w = tl.load(weight_ptr + c, mask=c < H, other=0.0).to(tl.float32)
                y = w[None, :] * y
            tl.store(out_ptr + out_offsets + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, num_heads: int, head_dim: int, eps: float, unit_offset: bool,
            config: dict, launcher: Launcher):
    num_tokens = x.shape[0]
    assert x.stride(-1) == 1 and weight.is_contiguous(), "rms_norm needs unit stride along the normalized dim"
    # the reference's `w * y` promotes: a float32 weight on bf16 activations gives float32,
    # except with unit_offset, where `1 + w` is first cast to the activation dtype
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=out_dtype, device=x.device)  # [T, num_heads * head_dim]
    residual_out = None
    if residual is not None:
        assert residual.dtype == x.dtype and residual.stride(-1) == 1, "residual must match x's dtype"
        residual_out = torch.empty(num_tokens, head_dim, dtype=x.dtype, device=x.device)  # [T, H]
    if num_tokens > 0:
        c = config["constexprs"]
        grid = (num_tokens, cdiv(num_heads, c["BLOCK_HEADS"]))
        launcher.launch(_rms_norm_kernel, grid,
                        (x, residual if residual is not None else x, weight, out,
                         residual_out if residual_out is not None else out,
                         num_heads, x.stride(0), residual.stride(0) if residual is not None else 0, float(eps)),
                        constexprs={"H": head_dim, "BLOCK_H": c["BLOCK_H"], "BLOCK_HEADS": c["BLOCK_HEADS"],
                                    "HAS_RESIDUAL": residual is not None, "UNIT_OFFSET": bool(unit_offset)},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out, residual_out


def rms_norm(x: torch.Tensor, *rest: torch.Tensor, eps: float, unit_offset: bool = False,
             config: dict, launcher: Launcher):
    """x [T, H], (residual [T, H]), weight [H] -> y [T, H], or (y, x + residual) with a residual."""
    residual = rest[0] if len(rest) == 2 else None
    out, residual_out = _launch(x, residual, rest[-1], 1, x.shape[1], eps, unit_offset, config, launcher)
    return out if residual_out is None else (out, residual_out)


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, *, num_heads: int, head_dim: int, eps: float,
                  unit_offset: bool = False, config: dict, launcher: Launcher) -> torch.Tensor:
    """x [T, num_heads * head_dim] (rows may be strided, e.g. q inside qkv), weight [head_dim]
    -> [T, num_heads * head_dim]."""
    return _launch(x, None, weight, num_heads, head_dim, eps, unit_offset, config, launcher)[0]


def _warps_for(elements: int) -> list[int]:
    # at least ~4 elements per thread; 1 to 8 warps
    return [w for w in (1, 2, 4, 8) if w == 1 or 32 * w * 4 <= elements]


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"H", "num_heads"}; every BLOCK_H either covers H or loops over it."""
    whole = next_power_of_2(problem["H"])
    num_heads = problem.get("num_heads", 1)
    block_hs = sorted({whole} | {b for b in (256, 512, 1024, 2048, 4096) if b < whole})
    configs = []
    for block_h in block_hs:
        heads = sorted({1} | {h for h in (2, 4, 8, 16, 32, 64) if h <= next_power_of_2(num_heads)
                              and h * block_h <= 8192})
        for block_heads in heads:
            for warps in _warps_for(block_h * block_heads):
                configs.append({"constexprs": {"BLOCK_H": block_h, "BLOCK_HEADS": block_heads},
                                "num_warps": warps, "num_stages": 1})
    return configs


def default_config(problem: dict) -> dict:
    whole = next_power_of_2(problem["H"])
    block_h = whole if whole <= 8192 else 4096
    # head norm: all heads of a token in one program, up to a 4096-element tile
    block_heads = min(next_power_of_2(problem.get("num_heads", 1)), max(1, 4096 // block_h))
    elements = block_h * block_heads
    warps = 8 if elements >= 8192 else 4 if elements >= 2048 else 2 if elements >= 512 else 1
    return {"constexprs": {"BLOCK_H": block_h, "BLOCK_HEADS": block_heads}, "num_warps": warps, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel  # noqa: E402


FAMILY = KernelFamily(
    "rms_norm", config_space=config_space, default_config=default_config,
    ops={"rms_norm": OpKernel(rms_norm, lambda a, ins, phase, runtime: {"H": ins[0].shape[1], "num_heads": 1}),
         "head_rms_norm": OpKernel(head_rms_norm, lambda a, ins, phase, runtime: {"H": a["head_dim"],
                                                                                  "num_heads": a["num_heads"]})})
