"""The sigmoid output gate: implements IR op `sigmoid_gate` (rdnac.ir.linear_attention), x * sigmoid(gate),
the output gate of gated full attention (gate [T, N]) and of a shared expert (gate [T, 1], one per token).

Program (token, column tile). Rounding as torch: sigmoid rounded to the
gate's dtype, the product in float32 rounded to the promoted dtype.

Config space: BLOCK_N, num_warps. Problem keys: {"N", "is_per_token", "dtype", "num_tokens"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

AOT_DIVISIBLE = {"_sigmoid_gate_kernel": ("N", "stride_x", "stride_gate")}


@triton.jit
def _sigmoid_gate_kernel(x_ptr, gate_ptr, out_ptr, N, stride_x, stride_gate,
                         IS_PER_TOKEN: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = n < N
    x = tl.load(x_ptr + token * stride_x + n, mask=mask, other=0.0).to(tl.float32)
    if IS_PER_TOKEN:
        gate = tl.load(gate_ptr + token * stride_gate)
    else:
        gate = tl.load(gate_ptr + token * stride_gate + n, mask=mask, other=0.0)
    s = (1.0 / (1.0 + tl.exp(-gate.to(tl.float32)))).to(gate.dtype).to(tl.float32)  # tl.sigmoid: a jit function
    tl.store(out_ptr + token * N + n, (x * s).to(out_ptr.dtype.element_ty), mask=mask)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor, *, config: dict, launcher: Launcher) -> torch.Tensor:
    """x [T, N], gate [T, N] or [T, 1] (rows may be strided) -> [T, N] in the promoted dtype."""
    assert x.stride(-1) == 1 and (gate.stride(-1) == 1 or gate.shape[-1] == 1)
    num_tokens, n = x.shape
    out = torch.empty(num_tokens, n, dtype=torch.promote_types(x.dtype, gate.dtype), device=x.device)
    if num_tokens > 0:
        block = config["constexprs"]["BLOCK_N"]
        launcher.launch(_sigmoid_gate_kernel, (num_tokens, cdiv(n, block)),
                        (x, gate, out, n, x.stride(0), gate.stride(0)),
                        constexprs={"IS_PER_TOKEN": gate.shape[-1] == 1 and n != 1, "BLOCK_N": block},
                        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def config_space(problem: dict) -> list[dict]:
    whole = next_power_of_2(problem["N"])
    blocks = sorted({min(whole, 1024)} | {b for b in (256, 2048, 4096) if b < whole})
    return [{"constexprs": {"BLOCK_N": b}, "num_warps": w, "num_stages": 1}
            for b in blocks for w in (4, 1, 8) if w == 1 or 32 * w * 4 <= b]


def default_config(problem: dict) -> dict:
    whole = next_power_of_2(problem["N"])
    block = min(whole, 1024)
    return {"constexprs": {"BLOCK_N": block}, "num_warps": 4 if block >= 512 else 1, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


FAMILY = KernelFamily(
    "sigmoid_gate", config_space=config_space, default_config=default_config,
    size=lambda p: p["num_tokens"],
    ops={"sigmoid_gate": OpKernel(sigmoid_gate, lambda a, ins, phase, runtime: {
        "N": ins[0].shape[1], "is_per_token": ins[1].shape[-1] == 1, "dtype": dtype_name(ins[0]),
        "num_tokens": ins[0].shape[0]})})
