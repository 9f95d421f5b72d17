"""Gated activation with FP8 activation quantization fused in: implements the IR op `gated_act_quant`.

Writes what `gated_act` followed by the `linear_fp8` wrapper's `_quant_fp8_kernel`
would, in one launch and without the bf16 round trip: fp8 values [T, I] and
float32 scales ([T, 1] per token, or [T, cdiv(I, GROUP)] per token and GROUP
columns). Both input forms of `gated_act` (gate and up, or the merged gate_up
[T, 2I] read at column offset I).

Bit for bit the unfused kernels' output: act(gate) in float32 with
`_gated_act_kernel`'s formulas, rounded to the activation dtype, times up,
rounded again, then `_quant_fp8_kernel`'s rule (scale = amax / FP8_MAX
correctly rounded; y / scale rounded to the FP8 grid in fp32, ties to even,
no -0; an exact cast).

Grid: per group, (T, cdiv(I, BLOCK_I)), each program quantizing whole groups
of its tile in one pass; per token, (T, 1), a program loops over its row
twice (the amax, then the values; the activation is recomputed rather than
stored). GROUP must be a power of two dividing BLOCK_I.

Config space: BLOCK_I (a power of two, >= GROUP), num_warps.
Problem keys: {"I", "group", "dtype"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS, FP8_MAX
from rdnac.kernels.activation import ACTIVATIONS, activate, gate_and_up
from rdnac.kernels.fp8_quant import GRID, fp8_scale, round_to_fp8_grid
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

AOT_DIVISIBLE = {"_gated_act_quant_kernel": ("I", "stride_gate_row", "stride_up_row", "up_col_offset")}

_MAX = tl.standard._elementwise_max  # tl.max is a jit function: the interpreter path cannot call it


@triton.jit
def _gated_act_quant_kernel(gate_ptr, up_ptr, q_ptr, scale_ptr, I, stride_gate_row, stride_up_row, up_col_offset,
                            ACT: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr,
                            MIN_NORMAL: tl.constexpr, SUBNORMAL_ROUNDER: tl.constexpr, BLOCK_I: tl.constexpr,
                            PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # gate, up: [T, I] rows (strided) -> q: [T, I] fp8, scale: [T, G] fp32 (both contiguous)
    act_dtype = gate_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    gate_row = gate_ptr + token * stride_gate_row
    up_row = up_ptr + token * stride_up_row + up_col_offset
    cols = tl.arange(0, BLOCK_I)  # [BLOCK_I]
    if GROUP > 0:  # this program's tile only, one pass
        first = tl.program_id(1) * BLOCK_I
        last = first + BLOCK_I
        num_passes: tl.constexpr = 1
    else:  # the whole row: its amax, then the values
        first = 0
        last = I
        num_passes: tl.constexpr = 2
    groups_per_tile: tl.constexpr = BLOCK_I // GROUP if GROUP > 0 else 1
    amax = tl.full([BLOCK_I], 0.0, tl.float32)
    for quant_pass in tl.static_range(num_passes):
        if quant_pass == 1:
            row_amax = tl.reduce(amax, 0, _MAX)
            scale = fp8_scale(row_amax, FP8_MAX)  # a zero row: 1, not 0/0
            tl.store(scale_ptr + token, scale)
        for start in range(first, last, BLOCK_I):
            offs = start + cols
            in_row = offs < I
            gate = tl.load(gate_row + offs, mask=in_row, other=0.0).to(tl.float32)
            up = tl.load(up_row + offs, mask=in_row, other=0.0).to(tl.float32)
            act = activate(gate, ACT)
            act = act.to(act_dtype).to(tl.float32)
            y = (act * up).to(act_dtype).to(tl.float32)  # what gated_act writes, back in fp32
            if GROUP > 0:  # whole groups: one scale per row of the [groups, GROUP] view
                y = tl.reshape(y, [groups_per_tile, GROUP])
                offs = tl.reshape(offs, [groups_per_tile, GROUP])
                in_row = offs < I
                group_amax = tl.reduce(tl.abs(y), 1, _MAX)  # [groups_per_tile]
                group_scale = fp8_scale(group_amax, FP8_MAX)
                groups = start // GROUP + tl.arange(0, groups_per_tile)
                num_groups = (I + GROUP - 1) // GROUP
                tl.store(scale_ptr + token * num_groups + groups, group_scale, mask=groups < num_groups)
                v = tl.div_rn(y, group_scale[:, None])
            elif quant_pass == 0:
                amax = tl.maximum(amax, tl.abs(y))
            else:
                v = tl.div_rn(y, scale)
            if quant_pass + 1 == num_passes:
                q = round_to_fp8_grid(v, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)  # see fp8_quant
                tl.store(q_ptr + token * I + offs, q.to(q_ptr.dtype.element_ty), mask=in_row)


def gated_act_quant(*xs: torch.Tensor, act: str = "silu", fp8_format: str, group: int = 0, config: dict,
                    launcher: Launcher) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate [T, I], up [T, I]) or (gate_up [T, 2I],) -> q [T, I] fp8, scale [T, G] float32
    (G = 1 or cdiv(I, group)); rows may be strided."""
    assert act in ACTIVATIONS, f"gated_act_quant requires act in {ACTIVATIONS}; got {act!r}"
    assert group == 0 or group & (group - 1) == 0, f"gated_act_quant requires a power-of-two group; got {group}"
    gate, up, width, up_col_offset = gate_and_up(xs)
    num_tokens = gate.shape[0]
    num_groups = cdiv(width, group) if group else 1
    q = torch.empty((num_tokens, width), dtype=FORMATS[fp8_format], device=gate.device)  # [T, I]
    scale = torch.empty((num_tokens, num_groups), dtype=torch.float32, device=gate.device)  # [T, G]
    if num_tokens == 0:
        return q, scale
    block_i = config["constexprs"]["BLOCK_I"]
    assert block_i >= group, f"gated_act_quant: BLOCK_I {block_i} must hold whole groups of {group}"
    grid = (num_tokens, cdiv(width, block_i) if group else 1)
    min_normal, rounder = GRID[fp8_format]
    launcher.launch(_gated_act_quant_kernel, grid,
                    (gate, up, q, scale, width, gate.stride(0), up.stride(0), up_col_offset),
                    constexprs={"ACT": act, "GROUP": group, "FP8_MAX": FP8_MAX[fp8_format], "MIN_NORMAL": min_normal,
                                "SUBNORMAL_ROUNDER": rounder, "BLOCK_I": block_i},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return q, scale


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"I", "group"}: tiles of whole groups; per token a program loops over its row."""
    group = problem.get("group", 0)
    whole = max(next_power_of_2(problem["I"]), group)
    blocks = sorted({b for b in (256, 512, 1024, 2048, 4096) if group <= b < whole} | {min(whole, 4096)})
    return [{"constexprs": {"BLOCK_I": b}, "num_warps": w, "num_stages": 1}
            for b in blocks for w in (1, 2, 4, 8) if w == 1 or 32 * w * 4 <= b]


def default_config(problem: dict) -> dict:
    # per group, 512-wide tiles, fewer warps as the step grows (H100, I 12288, group 128; bench/
    # small_kernels.py at 1345601: 1 token 1.96 us with 4 warps, 64 tokens 3.64 with 2, 2048 tokens 57.3 with 1; the
    # 1024-wide 4-warp tiles took 2.23, 3.95, 62.8); per token one program per row, so wider tiles and
    # more warps cover the row in fewer steps
    group = problem.get("group", 0)
    if group:
        m = problem.get("M", 1 << 30)
        block = min(max(next_power_of_2(problem["I"]), group), max(512, group))
        warps = max(1, min(4 if m <= 16 else 2 if m <= 256 else 1, block // 128))
        return {"constexprs": {"BLOCK_I": block}, "num_warps": warps, "num_stages": 1}
    block = min(next_power_of_2(problem["I"]), 4096)
    return {"constexprs": {"BLOCK_I": block}, "num_warps": 4 if block <= 1024 else 8, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    width = ins[0].shape[1]  # gate_up [T, 2I], or gate [T, I] with up
    return {"I": width if len(ins) == 2 else width // 2, "group": a["group"], "dtype": dtype_name(ins[0]),
            "M": ins[0].shape[0]}


FAMILY = KernelFamily("activation_quant", config_space=config_space, default_config=default_config,
                      ops={"gated_act_quant": OpKernel(gated_act_quant, _problem)})
