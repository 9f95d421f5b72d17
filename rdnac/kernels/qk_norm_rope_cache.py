"""q/k RMSNorm + RoPE + paged KV-cache write in one launch: implements the IR op `qk_norm_rope_cache`.

The unfused attention prologue is up to four launches that each read and
write q and k: head_rms_norm(q), head_rms_norm(k), rope(q, k),
kv_cache_write(k', v). Here a program takes BLOCK_HEADS heads of one token,
indexing q heads then k heads as one range (as `rope.py` does), and for
each head: loads the row once, normalizes it (attr qk_norm), rotates it, and
stores q' to the output or k' (and the matching v row) to cache slot
slot_mapping[t]. Slots < 0 are padding: their k/v stores are masked, q' is
still written (the unfused rope writes it too).

Rounding mirrors the unfused kernels step by step (`rms_norm.py`, `rope.py`,
`kv_cache.py`), so results match them bit for bit where the hardware's
reductions agree: the normalized value is rounded to the input dtype before
the weight product and the product to the norm's output dtype; cos/sin
(tl.cos/tl.sin of float(position) * inv_freq, as in rope.py, which on NVIDIA
lower to libdevice's precise versions) and each rotation product are rounded
to that dtype; k' is cast to the cache dtype at the store (an FP8 cache takes
k' / k_scale and v / v_scale, saturated: `kv_cache.to_cache`).

With PDL and EARLY_META (plan-wide, `runtime["early_meta"]`) the position,
the slot and the RoPE angles (step inputs no kernel writes, and math on them)
come before `griddepcontrol.wait`; only q, k and v are read after it.

Config space: BLOCK_HEADS, num_warps. Problem keys: {"head_dim",
"num_heads", "num_kv_heads", "qk_norm"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.kv_cache import cache_constexprs, to_cache
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2
from rdnac.kernels.rope import config_space as rope_config_space
from rdnac.kernels.rope import rope_lanes, rope_tables

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_qk_norm_rope_cache_kernel": (
    "block_size", "stride_q_row", "stride_k_row", "stride_v_row", "stride_kc_block", "stride_kc_slot",
    "stride_kc_head", "stride_vc_block", "stride_vc_slot", "stride_vc_head")}

# tl.sum is a @triton.jit function, which the interpreter path cannot call (see rms_norm.py)
_SUM = tl.standard._sum_combine


@triton.jit
def _qk_norm_rope_cache_kernel(q_ptr, k_ptr, v_ptr, positions_ptr, slot_mapping_ptr, inv_freq_ptr,
                               q_norm_ptr, k_norm_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                               num_heads, num_kv_heads, block_size, stride_q_row, stride_k_row, stride_v_row,
                               stride_kc_block, stride_kc_slot, stride_kc_head,
                               stride_vc_block, stride_vc_slot, stride_vc_head, attention_scaling, eps,
                               k_scale, v_scale,
                               HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_HEADS: tl.constexpr, IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr,
                               UNIT_OFFSET: tl.constexpr, CACHE_FP8: tl.constexpr = False,
                               FP8_MAX: tl.constexpr = 448.0, MIN_NORMAL: tl.constexpr = 0.0,
                               SUBNORMAL_ROUNDER: tl.constexpr = 0.0, PDL: tl.constexpr = False,
                               EARLY_META: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        if not EARLY_META:  # else after the position, slot and RoPE angles (step inputs no kernel writes)
            gdc_wait()
    in_dtype = q_ptr.dtype.element_ty
    act_dtype = q_out_ptr.dtype.element_ty  # the norm's output dtype, in which rope rounds
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # [BLOCK_HEADS], q heads then k heads
    is_q = heads < num_heads
    is_k = (heads >= num_heads) & (heads < num_heads + num_kv_heads)
    kv_heads = heads - num_heads  # negative for q heads: only ever used under is_k
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    # cos/sin [BLOCK_D] in float32, scaled, then rounded to the activation dtype like the reference
    partner, sign, is_rotated, cos, sin = rope_lanes(positions_ptr, inv_freq_ptr, token, attention_scaling, d,
                                                     act_dtype, ROTARY_DIM, IS_NEOX)
    # int64: slot * row stride overflows int32 on caches over 2**31 elements
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if PDL and EARLY_META:  # q, k and v are the previous kernel's output: read them only after it is done
        gdc_wait()

    in_rows = tl.where(is_q, q_ptr + token * stride_q_row + heads * HEAD_DIM,
                       k_ptr + token * stride_k_row + kv_heads * HEAD_DIM)[:, None]  # [BLOCK_HEADS, 1]
    mask = (is_q | is_k)[:, None] & (d < HEAD_DIM)[None, :]  # [BLOCK_HEADS, BLOCK_D]
    x = tl.load(in_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_HEADS, BLOCK_D]
    x_partner = tl.load(in_rows + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        # head_rms_norm of the row, and of the partner elements with the same row statistic
        rstd = tl.math.rsqrt(tl.reduce(x * x, 1, _SUM) / HEAD_DIM + eps)[:, None]  # [BLOCK_HEADS, 1]
        d_mask = d < HEAD_DIM
        w = tl.where(is_q[:, None], tl.load(q_norm_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :],
                     tl.load(k_norm_ptr + d, mask=d_mask, other=0.0).to(tl.float32)[None, :])
        w_partner = tl.where(is_q[:, None],
                             tl.load(q_norm_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :],
                             tl.load(k_norm_ptr + partner, mask=d_mask, other=0.0).to(tl.float32)[None, :])
        if UNIT_OFFSET:  # Gemma: the product in float32, rounded once
            x = ((x * rstd) * (1.0 + w)).to(act_dtype).to(tl.float32)
            x_partner = ((x_partner * rstd) * (1.0 + w_partner)).to(act_dtype).to(tl.float32)
        else:
            x = (w * (x * rstd).to(in_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
            x_partner = (w_partner * (x_partner * rstd).to(in_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
    a = (x * cos[None, :]).to(act_dtype).to(tl.float32)
    b = (x_partner * sin[None, :]).to(act_dtype).to(tl.float32)
    out = tl.where(is_rotated[None, :], a + sign[None, :] * b, x).to(act_dtype)  # [BLOCK_HEADS, BLOCK_D]

    q_dst = q_out_ptr + token * num_heads * HEAD_DIM + heads[:, None] * HEAD_DIM + d[None, :]
    tl.store(q_dst, out, mask=mask & is_q[:, None])

    block, offset = slot // block_size, slot % block_size
    # broadcast the slot before comparing: the interpreter rejects a mask built from a scalar bool & a block
    is_real = (tl.full([BLOCK_HEADS, 1], 0, tl.int64) + slot) >= 0  # [BLOCK_HEADS, 1]
    kv_mask = mask & is_k[:, None] & is_real
    k_dst = (k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
             + kv_heads[:, None] * stride_kc_head + d[None, :])
    k_stored = to_cache(out, k_scale, k_cache_ptr, CACHE_FP8, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)
    tl.store(k_dst, k_stored, mask=kv_mask)
    v = tl.load(v_ptr + token * stride_v_row + kv_heads[:, None] * HEAD_DIM + d[None, :], mask=kv_mask)
    v_dst = (v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
             + kv_heads[:, None] * stride_vc_head + d[None, :])
    tl.store(v_dst, to_cache(v, v_scale, v_cache_ptr, CACHE_FP8, FP8_MAX, MIN_NORMAL,
                                    SUBNORMAL_ROUNDER), mask=kv_mask)


def qk_norm_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       slot_mapping: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       *norm_weights: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                       rotary_dim: int, theta: float, style: str = "neox", scaling: dict | None = None,
                       qk_norm: bool = False, eps: float = 1e-6, unit_offset: bool = False,
                       k_scale: float = 1.0, v_scale: float = 1.0, inv_freq: torch.Tensor,
                       attention_scaling: float, config: dict, launcher: Launcher) -> torch.Tensor:
    """q [T, Hq*D], k, v [T, Hk*D] (rows may be strided views of a qkv output), positions [T],
    slot_mapping [T], caches [NB, BS, Hk, D] (written in place), (q_norm, k_norm [D]) -> q' [T, Hq*D].

    `theta` and `scaling` mirror the op; the kernel reads the precomputed
    `inv_freq [rotary_dim/2]` float32 and `attention_scaling`, as rope.rope does."""
    assert style in ("neox", "gptj"), f"rope style must be 'neox' or 'gptj'; got {style!r}"
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim, f"bad rotary_dim {rotary_dim} for head_dim {head_dim}"
    assert inv_freq.shape == (rotary_dim // 2,) and inv_freq.dtype == torch.float32, \
        f"inv_freq must be float32 [{rotary_dim // 2}]; got {inv_freq.dtype} {tuple(inv_freq.shape)}"
    assert k_cache.shape[1:] == v_cache.shape[1:] and k_cache.shape[2:] == (num_kv_heads, head_dim), \
        f"caches must be [NB, BS, {num_kv_heads}, {head_dim}]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
    assert all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache)) and q.dtype == k.dtype
    assert len(norm_weights) == (2 if qk_norm else 0), "q_norm and k_norm weights are passed exactly when qk_norm"
    out_dtype = q.dtype
    if qk_norm:
        q_norm, k_norm = norm_weights
        assert q_norm.is_contiguous() and k_norm.is_contiguous() and q_norm.dtype == k_norm.dtype
        # the reference's `w * y` promotes (a float32 weight on bf16 activations), except with unit_offset
        out_dtype = q.dtype if unit_offset else torch.promote_types(q.dtype, q_norm.dtype)
    else:
        q_norm = k_norm = q  # never read (QK_NORM=False)
    num_tokens = q.shape[0]
    q_out = torch.empty(num_tokens, num_heads * head_dim, dtype=out_dtype, device=q.device)  # [T, Hq*D]
    if num_tokens == 0:
        return q_out
    block_heads = config["constexprs"]["BLOCK_HEADS"]
    grid = (num_tokens, cdiv(num_heads + num_kv_heads, block_heads))
    launcher.launch(_qk_norm_rope_cache_kernel, grid,
                    (q, k, v, positions, slot_mapping, inv_freq, q_norm, k_norm, q_out, k_cache, v_cache,
                     num_heads, num_kv_heads, k_cache.shape[1], q.stride(0), k.stride(0), v.stride(0),
                     k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), float(attention_scaling), float(eps),
                     float(k_scale), float(v_scale)),
                    constexprs={"HEAD_DIM": head_dim, "ROTARY_DIM": rotary_dim,
                                "BLOCK_D": next_power_of_2(head_dim), "BLOCK_HEADS": block_heads,
                                "IS_NEOX": style == "neox", "QK_NORM": bool(qk_norm), "UNIT_OFFSET": bool(unit_offset),
                                **cache_constexprs(k_cache)},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return q_out


# The same tiles as rope's (heads of one token, any BLOCK_HEADS is correct: masked); only the default differs.
config_space = rope_config_space


def default_config(problem: dict) -> dict:
    # Tiles of 512 elements of heads at decode sizes (M <= 16 tokens), 1024 above: per-element RoPE work
    # (precise cos/sin) makes a program's latency grow with its tile. H100, Qwen3-8B widths (32 + 8 heads
    # of 128; bench/small_kernels.py at 1345601): 1 token 2.4 us (was 2.9 with 2048-element tiles), 16 tokens 2.7
    # (2.9), 2048 tokens 24.5 (28.2) with 2 warps per 1024 elements.
    block_d = next_power_of_2(problem["head_dim"])
    all_heads = next_power_of_2(problem["num_heads"] + problem["num_kv_heads"])
    m = problem.get("M", 1 << 30)
    heads = min(all_heads, max(1, (512 if m <= 16 else 1024) // block_d))
    elements = heads * block_d
    warps = (4 if m <= 64 else 2) if elements >= 512 else 1
    return {"constexprs": {"BLOCK_HEADS": heads}, "num_warps": warps, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"head_dim": a["head_dim"], "num_heads": a["num_heads"], "num_kv_heads": a["num_kv_heads"],
            "qk_norm": a["qk_norm"], "M": ins[0].shape[0]}


FAMILY = KernelFamily("qk_norm_rope_cache", config_space=config_space, default_config=default_config,
                      ops={"qk_norm_rope_cache": OpKernel(qk_norm_rope_cache, _problem, node_kwargs=rope_tables)})
