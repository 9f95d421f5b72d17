"""Gated RMSNorm with per-token 8-bit activation quantization fused in: implements IR op
`gated_rms_norm_quant` (rdnac.ir.linear_attention), the GDN output as out_proj's int8 (or FP8) activations.

Writes what `gated_rms_norm` followed by the `linear_int8` / `linear_fp8` wrapper's `_quant_fp8_kernel`
would, in one launch and without the bf16 round trip: the values [T, H*D] and their float32 scale [T, 1].
One program per token holds all its heads ([BLOCK_HEADS >= H, BLOCK_D] tile), since a per-token scale
needs the whole row: per head `_gated_rms_norm_kernel`'s arithmetic (the statistic in float32, the
normalized value rounded to x's dtype, the weight product, times silu(gate) in float32, rounded to x's
dtype), then `_quant_fp8_kernel`'s rule (scale = amax / FP8_MAX correctly rounded; y / scale rounded to the
format's grid, ties to even) before an exact cast.

Config space: num_warps. Problem keys: {"num_heads", "head_dim", "dtype", "num_tokens"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS, FP8_MAX
from rdnac.kernels.fp8_quant import GRID, fp8_scale, round_to_fp8_grid
from rdnac.kernels.gated_rms_norm import gated_norm_heads, norm_problem
from rdnac.kernels.launch import Launcher, next_power_of_2

AOT_DIVISIBLE = {"_gated_rms_norm_quant_kernel": ("stride_x", "stride_gate")}

_MAX = tl.standard._elementwise_max


@triton.jit
def _gated_rms_norm_quant_kernel(x_ptr, gate_ptr, weight_ptr, q_ptr, scale_ptr, num_heads, stride_x, stride_gate,
                                 eps, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                                 IS_SILU: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr,
                                 SUBNORMAL_ROUNDER: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)  # [BLOCK_HEADS]: every head of the token
    y, cols, mask = gated_norm_heads(x_ptr + token * stride_x, gate_ptr + token * stride_gate, weight_ptr, heads,
                                     num_heads, eps, D, BLOCK_D, IS_SILU)
    y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # what gated_rms_norm writes, back in fp32 (masked lanes are 0)
    amax = tl.reduce(tl.reduce(tl.abs(y), 1, _MAX), 0, _MAX)
    scale = fp8_scale(amax, FP8_MAX)  # a zero row: 1, not 0/0
    tl.store(scale_ptr + token, scale)
    q = round_to_fp8_grid(tl.div_rn(y, scale), FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)  # see fp8_quant
    tl.store(q_ptr + token * num_heads * D + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm_quant(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, *, num_heads: int,
                         head_dim: int, eps: float, act: str = "silu", fp8_format: str, group: int = 0,
                         config: dict, launcher: Launcher) -> tuple[torch.Tensor, torch.Tensor]:
    """x, gate [T, num_heads * head_dim] (rows may be strided), weight [head_dim] -> q [T, num_heads * head_dim]
    in `fp8_format`, scale [T, 1] float32."""
    assert group == 0, f"gated_rms_norm_quant quantizes per token (group 0); got group {group}"
    assert x.stride(-1) == 1 and gate.stride(-1) == 1 and weight.is_contiguous()
    num_tokens = x.shape[0]
    q = torch.empty(num_tokens, num_heads * head_dim, dtype=FORMATS[fp8_format], device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    if num_tokens > 0:
        min_normal, rounder = GRID[fp8_format]
        launcher.launch(_gated_rms_norm_quant_kernel, (num_tokens,),
                        (x, gate, weight, q, scale, num_heads, x.stride(0), gate.stride(0), float(eps)),
                        constexprs={"D": head_dim, "BLOCK_D": next_power_of_2(head_dim),
                                    "BLOCK_HEADS": next_power_of_2(num_heads), "IS_SILU": act == "silu",
                                    "FP8_MAX": FP8_MAX[fp8_format], "MIN_NORMAL": min_normal,
                                    "SUBNORMAL_ROUNDER": rounder},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return q, scale


def config_space(problem: dict) -> list[dict]:
    """num_warps for the one-program-per-token tile: 8 or 16 for wide rows (Qwen3.5-27B: 48 heads x 128)."""
    elements = next_power_of_2(problem["num_heads"]) * next_power_of_2(problem["head_dim"])
    warps = [w for w in (8, 16, 4, 2, 1) if w == 1 or 32 * w * 4 <= elements]
    return [{"constexprs": {}, "num_warps": w, "num_stages": 1} for w in warps]


def default_config(problem: dict) -> dict:
    return config_space(problem)[0]


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel  # noqa: E402


FAMILY = KernelFamily("gated_rms_norm_quant", config_space=config_space, default_config=default_config,
                      size=lambda p: p["num_tokens"],
                      ops={"gated_rms_norm_quant": OpKernel(gated_rms_norm_quant, norm_problem)})
