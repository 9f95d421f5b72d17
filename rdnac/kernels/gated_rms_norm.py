"""Gated RMSNorm of the Gated DeltaNet output: implements IR op `gated_rms_norm`
(rdnac.ir.linear_attention), the norm and the SiLU gate fused in one pass.

Program (token, head tile) normalises BLOCK_HEADS heads of D values of one
token: the statistic in float32, the normalized value rounded to x's dtype,
the weight product rounded to the promoted dtype of weight and x (torch's
`weight * normed`), then times silu(gate) in float32, rounded to x's dtype.

Config space: BLOCK_HEADS (heads per program), num_warps. Problem keys:
{"num_heads", "head_dim", "dtype", "num_tokens"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

AOT_DIVISIBLE = {"_gated_rms_norm_kernel": ("stride_x", "stride_gate")}

_SUM = tl.standard._sum_combine  # see rms_norm.py


@triton.jit
def gated_norm_heads(x_row, gate_row, weight_ptr, heads, num_heads, eps, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     IS_SILU: tl.constexpr):
    """One token's heads [BLOCK_HEADS] (x_row, gate_row: the token's rows) normalised and gated, float32
    [BLOCK_HEADS, BLOCK_D] before the final rounding to x's dtype, with the tile's offsets `cols` in the
    row and its mask (the other lanes are 0). Shared with gated_rms_norm_quant, which quantizes the row."""
    x_dtype = x_row.dtype.element_ty
    d = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (d < D)[None, :]
    cols = heads[:, None] * D + d[None, :]  # [BLOCK_HEADS, BLOCK_D]
    xf = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.reduce(xf * xf, 1, _SUM) / D + eps)  # [BLOCK_HEADS]
    normed = (xf * rstd[:, None]).to(x_dtype).to(tl.float32)
    w = tl.load(weight_ptr + d, mask=d < D, other=0.0).to(tl.float32)  # [BLOCK_D]
    y = w[None, :] * normed
    if weight_ptr.dtype.element_ty != tl.float32:  # both 16-bit: the product rounds to x's dtype
        y = y.to(x_dtype).to(tl.float32)
    if IS_SILU:
        gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = y * (gate / (1.0 + tl.exp(-gate)))  # silu; tl.sigmoid is a jit function (see rms_norm.py)
    return y, cols, mask


@triton.jit
def _gated_rms_norm_kernel(x_ptr, gate_ptr, weight_ptr, out_ptr, num_heads, stride_x, stride_gate, eps,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                           IS_SILU: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # [BLOCK_HEADS]
    y, cols, mask = gated_norm_heads(x_ptr + token * stride_x, gate_ptr + token * stride_gate, weight_ptr, heads,
                                     num_heads, eps, D, BLOCK_D, IS_SILU)
    tl.store(out_ptr + token * num_heads * D + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *, num_heads: int, head_dim: int,
                   eps: float, act: str = "silu", config: dict, launcher: Launcher) -> torch.Tensor:
    """x, gate [T, num_heads * head_dim] (rows may be strided), weight [head_dim] -> [T, num_heads * head_dim]."""
    assert x.stride(-1) == 1 and gate.stride(-1) == 1 and weight.is_contiguous()
    num_tokens = x.shape[0]
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=x.dtype, device=x.device)
    if num_tokens > 0:
        c = config["constexprs"]
        launcher.launch(_gated_rms_norm_kernel, (num_tokens, cdiv(num_heads, c["BLOCK_HEADS"])),
                        (x, gate, weight, out, num_heads, x.stride(0), gate.stride(0), float(eps)),
                        constexprs={"D": head_dim, "BLOCK_D": next_power_of_2(head_dim),
                                    "BLOCK_HEADS": c["BLOCK_HEADS"], "IS_SILU": act == "silu"},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def config_space(problem: dict) -> list[dict]:
    block_d, heads = next_power_of_2(problem["head_dim"]), next_power_of_2(problem["num_heads"])
    configs = []
    for block_heads in sorted({min(heads, max(1, 2048 // block_d))} | {h for h in (1, 4, 16) if h <= heads},
                              reverse=True):
        for warps in (4, 2, 8, 1):
            if warps == 1 or 32 * warps * 4 <= block_heads * block_d:
                configs.append({"constexprs": {"BLOCK_HEADS": block_heads}, "num_warps": warps, "num_stages": 1})
    return configs


def default_config(problem: dict) -> dict:
    return config_space(problem)[0]


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def norm_problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    """The problem of a gated norm node (this family's and gated_rms_norm_quant's)."""
    return {"num_heads": a["num_heads"], "head_dim": a["head_dim"], "dtype": dtype_name(ins[0]),
            "num_tokens": ins[0].shape[0]}


FAMILY = KernelFamily("gated_rms_norm", config_space=config_space, default_config=default_config,
                      size=lambda p: p["num_tokens"], ops={"gated_rms_norm": OpKernel(gated_rms_norm, norm_problem)})
