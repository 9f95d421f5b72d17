"""The sigmoid output gate with per-token 8-bit activation quantization fused in: implements IR op
`sigmoid_gate_quant` (rdnac.ir.linear_attention), gated attention's output as o_proj's int8 (or FP8)
activations (Qwen3.5, Qwen3-Next).

Writes what `sigmoid_gate` followed by the `linear_int8` / `linear_fp8` wrapper's `_quant_fp8_kernel` would,
in one launch and without the bf16 round trip: the values [T, N] and their float32 scale [T, 1]. One program
per token loops over its row twice in BLOCK_N tiles (the row amax, then the values; the gate is recomputed
rather than stored), each value as `_sigmoid_gate_kernel` computes it (the sigmoid rounded to the gate's
dtype, the product rounded to the output dtype), then `_quant_fp8_kernel`'s rule.

Config space: BLOCK_N, num_warps. Problem keys: {"N", "dtype", "num_tokens"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS, FP8_MAX
from rdnac.kernels.fp8_quant import GRID, fp8_scale, round_to_fp8_grid
from rdnac.kernels.launch import Launcher, next_power_of_2

AOT_DIVISIBLE = {"_sigmoid_gate_quant_kernel": ("N", "stride_x", "stride_gate")}

_MAX = tl.standard._elementwise_max  # tl.max is a jit function: the interpreter path cannot call it
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _sigmoid_gate_quant_kernel(x_ptr, gate_ptr, q_ptr, scale_ptr, N, stride_x, stride_gate,
                               Y_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr,
                               SUBNORMAL_ROUNDER: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    amax = tl.full([BLOCK_N], 0.0, tl.float32)
    for quant_pass in tl.static_range(2):
        if quant_pass == 1:
            scale = fp8_scale(tl.reduce(amax, 0, _MAX), FP8_MAX)  # a zero row: 1, not 0/0
            tl.store(scale_ptr + token, scale)
        for start in range(0, N, BLOCK_N):
            n = start + cols
            mask = n < N
            x = tl.load(x_ptr + token * stride_x + n, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + token * stride_gate + n, mask=mask, other=0.0)
            s = (1.0 / (1.0 + tl.exp(-gate.to(tl.float32)))).to(gate.dtype).to(tl.float32)  # as _sigmoid_gate_kernel
            y = (x * s).to(Y_DTYPE).to(tl.float32)  # what sigmoid_gate writes, back in fp32
            if quant_pass == 0:
                amax = tl.maximum(amax, tl.abs(y))
            else:
                q = round_to_fp8_grid(tl.div_rn(y, scale), FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)  # see fp8_quant
                tl.store(q_ptr + token * N + n, q.to(q_ptr.dtype.element_ty), mask=mask)


def sigmoid_gate_quant(x: torch.Tensor, gate: torch.Tensor, *, fp8_format: str, group: int = 0, config: dict,
                       launcher: Launcher) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N], gate [T, N] (rows may be strided) -> q [T, N] in `fp8_format`, scale [T, 1] float32."""
    assert group == 0, f"sigmoid_gate_quant quantizes per token (group 0); got group {group}"
    assert x.stride(-1) == 1 and gate.stride(-1) == 1 and gate.shape == x.shape, "a per-column gate [T, N]"
    num_tokens, n = x.shape
    q = torch.empty(num_tokens, n, dtype=FORMATS[fp8_format], device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device)
    if num_tokens > 0:
        min_normal, rounder = GRID[fp8_format]
        launcher.launch(_sigmoid_gate_quant_kernel, (num_tokens,),
                        (x, gate, q, scale, n, x.stride(0), gate.stride(0)),
                        constexprs={"Y_DTYPE": _TL_DTYPES[torch.promote_types(x.dtype, gate.dtype)],
                                    "FP8_MAX": FP8_MAX[fp8_format], "MIN_NORMAL": min_normal,
                                    "SUBNORMAL_ROUNDER": rounder, "BLOCK_N": config["constexprs"]["BLOCK_N"]},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return q, scale


def config_space(problem: dict) -> list[dict]:
    whole = next_power_of_2(problem["N"])
    blocks = sorted({min(whole, 4096)} | {b for b in (1024, 2048) if b < whole})
    return [{"constexprs": {"BLOCK_N": b}, "num_warps": w, "num_stages": 1}
            for b in blocks for w in (8, 4, 1) if w == 1 or 32 * w * 4 <= b]


def default_config(problem: dict) -> dict:
    block = min(next_power_of_2(problem["N"]), 4096)  # Qwen3.5-27B's 24 x 256: two tiles per pass
    return {"constexprs": {"BLOCK_N": block}, "num_warps": 8 if block >= 1024 else 4 if block >= 512 else 1,
            "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


FAMILY = KernelFamily(
    "sigmoid_gate_quant", config_space=config_space, default_config=default_config,
    size=lambda p: p["num_tokens"],
    ops={"sigmoid_gate_quant": OpKernel(sigmoid_gate_quant, lambda a, ins, phase, runtime: {
        "N": ins[0].shape[1], "dtype": dtype_name(ins[0]), "num_tokens": ins[0].shape[0]})})
