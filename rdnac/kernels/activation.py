"""Gated activation: implements the IR op `gated_act`, act(gate) * up.

Both input forms: gate [T, I] and up [T, I], or the merged gate_up [T, 2I]
output of a merged gate/up linear (gate is the first half of each row, as
`chunk(2, dim=-1)` in the reference). Activations: "silu", "gelu" (erf)
and "gelu_tanh". Rounding mirrors the reference: act(gate) is computed in
float32 and rounded to the activation dtype before the product with up.

Config space: BLOCK_I (a power of two; the grid tiles I), num_warps.
Problem keys: {"I": intermediate size, "dtype"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_gated_act_kernel": ("I", "stride_gate_row", "stride_up_row", "up_col_offset")}

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@triton.jit
def activate(gate, ACT: tl.constexpr):
    """ACT(gate) in fp32, the formulas of every kernel that applies a gated activation (this one, the
    gated GEMMs' epilogues, gated_act_quant), so fused and unfused paths give the same bits. gelu_tanh
    writes tanh(z) = 1 - 2 / (exp(2z) + 1), which saturates correctly at both ends."""
    if ACT == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACT == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    return act


@triton.jit
def _gated_act_kernel(gate_ptr, up_ptr, out_ptr, I, stride_gate_row, stride_up_row, up_col_offset,
                      ACT: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    act_dtype = out_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    mask = cols < I
    gate = tl.load(gate_ptr + token * stride_gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + token * stride_up_row + up_col_offset + cols, mask=mask, other=0.0).to(tl.float32)
    act = activate(gate, ACT)
    act = act.to(act_dtype).to(tl.float32)
    tl.store(out_ptr + token * I + cols, (act * up).to(act_dtype), mask=mask)


def gate_and_up(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(gate, up, I, up's column offset) from (gate [T, I], up [T, I]) or (gate_up [T, 2I],), where up
    is the same tensor as gate read from column I."""
    if len(xs) == 2:
        gate, up = xs
        width, up_col_offset = gate.shape[1], 0
    else:
        (gate,) = xs
        up = gate
        assert gate.shape[1] % 2 == 0, f"gate_up width must be even; got {gate.shape[1]}"
        width = up_col_offset = gate.shape[1] // 2
    assert gate.stride(-1) == 1 and up.stride(-1) == 1 and gate.dtype == up.dtype
    return gate, up, width, up_col_offset


def gated_act(*xs: torch.Tensor, act: str = "silu", config: dict, launcher: Launcher) -> torch.Tensor:
    """(gate [T, I], up [T, I]) or (gate_up [T, 2I],) -> [T, I]; rows may be strided."""
    assert act in ACTIVATIONS, f"gated_act requires act in {ACTIVATIONS}; got {act!r}"
    gate, up, width, up_col_offset = gate_and_up(xs)
    num_tokens = gate.shape[0]
    out = torch.empty(num_tokens, width, dtype=gate.dtype, device=gate.device)  # [T, I]
    if num_tokens == 0:
        return out
    block_i = config["constexprs"]["BLOCK_I"]
    grid = (num_tokens, cdiv(width, block_i))
    launcher.launch(_gated_act_kernel, grid,
                    (gate, up, out, width, gate.stride(0), up.stride(0), up_col_offset),
                    constexprs={"ACT": act, "BLOCK_I": block_i},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"I": intermediate size}."""
    whole = next_power_of_2(problem["I"])
    blocks = sorted({b for b in (256, 512, 1024, 2048, 4096) if b < whole} | {min(whole, 4096)})
    return [{"constexprs": {"BLOCK_I": b}, "num_warps": w, "num_stages": 1}
            for b in blocks for w in (1, 2, 4, 8) if w == 1 or 32 * w * 4 <= b]


def default_config(problem: dict) -> dict:
    # 1024-wide tiles: enough programs at decode (I / 1024 per token), 8 elements per thread
    block = min(next_power_of_2(problem["I"]), 1024)
    return {"constexprs": {"BLOCK_I": block}, "num_warps": 4 if block >= 1024 else max(1, block // 256),
            "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    width = ins[0].shape[1]  # gate_up [T, 2I], or gate [T, I] with up
    return {"I": width if len(ins) == 2 else width // 2}


FAMILY = KernelFamily("activation", config_space=config_space, default_config=default_config,
                      ops={"gated_act": OpKernel(gated_act, _problem)})
