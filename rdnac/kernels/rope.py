"""Rotary position embedding: implements the IR op `rope` for q and k in one launch.

Pairing styles: "neox" rotates (d, d + R/2), "gptj" rotates (2j, 2j + 1);
dims at and past rotary_dim R (partial rotary) are copied unchanged. Every
scaling variant (none, linear, llama3, yarn) reduces to a float32 `inv_freq
[R/2]` and an `attention_scaling` factor, which the runtime computes once at
load with `rdnac.ir.rope_math.rope_inv_freq`; the kernel forms
angle = float(position) * inv_freq[j] in float32 exactly as the reference
does, then cos/sin. Rounding mirrors the reference (and Hugging Face): cos
and sin are rounded to the activation dtype, and so is each product before
the sum.

A program handles BLOCK_HEADS heads of one token, indexing q heads then k
heads as one range, so q and k share the cos/sin it computes.
Config space: BLOCK_HEADS, num_warps. Problem keys: {"head_dim",
"num_heads", "num_kv_heads", "dtype"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_rope_kernel": ("stride_q_row", "stride_k_row")}


@triton.jit
def rope_lanes(positions_ptr, inv_freq_ptr, token, attention_scaling, d, ACT_DTYPE: tl.constexpr,
               ROTARY_DIM: tl.constexpr, IS_NEOX: tl.constexpr):
    """For the lanes d [BLOCK_D] of a head of `token`: (partner lane, sign, is_rotated, cos, sin), so that
    out[d] = x[d] * cos[d] + sign[d] * x[partner[d]] * sin[d] on the rotated lanes (each product rounded
    to ACT_DTYPE by the caller); cos/sin are computed in float32, scaled, then rounded to ACT_DTYPE as the
    reference does. Lanes past ROTARY_DIM are their own partner. NeoX pairs d with d +- R/2, GPT-J d ^ 1.
    The rope kernel and the fused q/k-norm + RoPE + cache kernel both take their lanes from here."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    if IS_NEOX:
        freq_index = d % HALF
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
    else:
        freq_index = d // 2
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    is_rotated = d < ROTARY_DIM
    partner = tl.where(is_rotated, partner, d)
    position = tl.load(positions_ptr + token).to(tl.float32)
    angle = position * tl.load(inv_freq_ptr + freq_index, mask=is_rotated, other=0.0)
    cos = (tl.cos(angle) * attention_scaling).to(ACT_DTYPE).to(tl.float32)
    sin = (tl.sin(angle) * attention_scaling).to(ACT_DTYPE).to(tl.float32)
    return partner, sign, is_rotated, cos, sin


@triton.jit
def _rope_kernel(q_ptr, k_ptr, positions_ptr, inv_freq_ptr, q_out_ptr, k_out_ptr,
                 num_heads, num_kv_heads, stride_q_row, stride_k_row, attention_scaling,
                 HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_HEADS: tl.constexpr, IS_NEOX: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    act_dtype = q_out_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # [BLOCK_HEADS], q heads then k heads
    is_q = heads < num_heads
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    # cos/sin [BLOCK_D] in float32, scaled, then rounded to the activation dtype like the reference
    partner, sign, is_rotated, cos, sin = rope_lanes(positions_ptr, inv_freq_ptr, token, attention_scaling, d,
                                                     act_dtype, ROTARY_DIM, IS_NEOX)

    # row start of each head; the k-side offset is negative for q heads but never dereferenced
    in_rows = tl.where(is_q, q_ptr + token * stride_q_row + heads * HEAD_DIM,
                       k_ptr + token * stride_k_row + (heads - num_heads) * HEAD_DIM)[:, None]  # [BLOCK_HEADS, 1]
    out_rows = tl.where(is_q, q_out_ptr + token * num_heads * HEAD_DIM + heads * HEAD_DIM,
                        k_out_ptr + token * num_kv_heads * HEAD_DIM + (heads - num_heads) * HEAD_DIM)[:, None]
    mask = (heads < num_heads + num_kv_heads)[:, None] & (d < HEAD_DIM)[None, :]
    x = tl.load(in_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_HEADS, BLOCK_D]
    x_partner = tl.load(in_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    a = (x * cos[None, :]).to(act_dtype).to(tl.float32)
    b = (x_partner * sin[None, :]).to(act_dtype).to(tl.float32)
    out = tl.where(is_rotated[None, :], a + sign[None, :] * b, x)
    tl.store(out_rows + d[None, :], out.to(act_dtype), mask=mask)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, num_heads: int, num_kv_heads: int,
         head_dim: int, rotary_dim: int, theta: float, style: str = "neox", scaling: dict | None = None,
         inv_freq: torch.Tensor, attention_scaling: float, config: dict, launcher: Launcher):
    """q [T, Hq*D], k [T, Hk*D] (rows may be strided views of a qkv output), positions [T] -> (q', k').

    `theta` and `scaling` are accepted to mirror the op; the kernel reads the
    precomputed `inv_freq [rotary_dim/2]` float32 and `attention_scaling`."""
    assert style in ("neox", "gptj"), f"rope style must be 'neox' or 'gptj'; got {style!r}"
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim, f"bad rotary_dim {rotary_dim} for head_dim {head_dim}"
    assert inv_freq.shape == (rotary_dim // 2,) and inv_freq.dtype == torch.float32, \
        f"inv_freq must be float32 [{rotary_dim // 2}]; got {inv_freq.dtype} {tuple(inv_freq.shape)}"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == k.dtype
    num_tokens = q.shape[0]
    q_out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)  # [T, Hq*D]
    k_out = torch.empty(num_tokens, num_kv_heads * head_dim, dtype=k.dtype, device=k.device)  # [T, Hk*D]
    if num_tokens == 0:
        return q_out, k_out
    block_heads = config["constexprs"]["BLOCK_HEADS"]
    grid = (num_tokens, cdiv(num_heads + num_kv_heads, block_heads))
    launcher.launch(_rope_kernel, grid,
                    (q, k, positions, inv_freq, q_out, k_out, num_heads, num_kv_heads,
                     q.stride(0), k.stride(0), float(attention_scaling)),
                    constexprs={"HEAD_DIM": head_dim, "ROTARY_DIM": rotary_dim,
                                "BLOCK_D": next_power_of_2(head_dim), "BLOCK_HEADS": block_heads,
                                "IS_NEOX": style == "neox"},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return q_out, k_out


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"head_dim", "num_heads", "num_kv_heads"}; any BLOCK_HEADS is correct (masked)."""
    block_d = next_power_of_2(problem["head_dim"])
    all_heads = next_power_of_2(problem["num_heads"] + problem["num_kv_heads"])
    heads = sorted({h for h in (1, 2, 4, 8, 16, 32, 64) if h <= all_heads} | {all_heads})
    return [{"constexprs": {"BLOCK_HEADS": h}, "num_warps": w, "num_stages": 1}
            for h in heads for w in (1, 2, 4, 8) if w == 1 or 32 * w * 4 <= h * block_d]


def default_config(problem: dict) -> dict:
    block_d = next_power_of_2(problem["head_dim"])
    all_heads = next_power_of_2(problem["num_heads"] + problem["num_kv_heads"])
    heads = min(all_heads, max(1, 2048 // block_d))
    elements = heads * block_d
    warps = 4 if elements >= 2048 else 2 if elements >= 512 else 1
    return {"constexprs": {"BLOCK_HEADS": heads}, "num_warps": warps, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.ir.rope_math import rope_inv_freq  # noqa: E402
from rdnac.kernels.registry import KernelFamily, OpKernel  # noqa: E402


def rope_tables(attrs: dict, device) -> dict:
    """The wrapper's RoPE tables, computed once per node when a plan is loaded (from the node's attrs)."""
    inv_freq, scaling = rope_inv_freq(attrs["rotary_dim"], attrs["theta"], attrs.get("scaling"))
    return {"inv_freq": inv_freq.to(device), "attention_scaling": scaling}


def heads_problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"head_dim": a["head_dim"], "num_heads": a["num_heads"], "num_kv_heads": a["num_kv_heads"]}


FAMILY = KernelFamily("rope", config_space=config_space, default_config=default_config,
                      ops={"rope": OpKernel(rope, heads_problem, node_kwargs=rope_tables)})
