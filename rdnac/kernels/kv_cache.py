"""Paged KV-cache write: implements the IR op `kv_cache_write`.

Token t's K and V rows go to slot s = slot_mapping[t] of the paged caches
[NB, BS, Hk, D], i.e. block s // BS, offset s % BS, cast to the cache dtype; an FP8 cache
(`--kv-cache-dtype fp8`) takes K / k_scale and V / v_scale saturated to the
format's range (`to_cache`, shared with qk_norm_rope_cache.py).
Slots < 0 mark padded tokens (a partial decode batch padded up to a
captured size): the kernel masks their loads and stores, so their cache
slots are never touched. The check is on the device because the wrapper
must not read slot_mapping on the host (CUDA-graph capture).

A program writes BLOCK_HEADS heads of one token.
Config space: BLOCK_HEADS, num_warps. Problem keys: {"num_kv_heads",
"head_dim", "dtype"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FP8_MAX, kv_format
from rdnac.kernels.fp8_quant import GRID, round_to_fp8_grid
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# model-shape ints (never token counts) that AOT binaries specialize on divisibility by 16, as the JIT does,
# so row loads vectorize; see rdnac.kernels.launch.divisible_args
AOT_DIVISIBLE = {"_kv_cache_write_kernel": (
    "block_size", "stride_k_row", "stride_v_row", "stride_kc_block", "stride_kc_slot", "stride_kc_head",
    "stride_vc_block", "stride_vc_slot", "stride_vc_head")}


@triton.jit
def to_cache(x, scale, cache_ptr, CACHE_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
             MIN_NORMAL: tl.constexpr, SUBNORMAL_ROUNDER: tl.constexpr):
    """x as the cache stores it: cast; for an FP8 cache x / scale in float32, saturated (the cast alone
    would give NaN on overflow) and rounded to nearest even in float32 (`fp8_quant.round_to_fp8_grid`:
    the cast is then exact, whatever rounding a target's or the interpreter's conversion does), so the
    values are `rdnac.ir.fp8.to_kv_cache`'s (a negative that rounds to zero is stored as +0, never -0:
    its bits are NaN in e4m3fnuz)."""
    if CACHE_FP8:
        y = round_to_fp8_grid(tl.div_rn(x.to(tl.float32), scale), FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)
        y = y.to(cache_ptr.dtype.element_ty)
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    return y


def cache_constexprs(cache: torch.Tensor) -> dict:
    """The constexprs of `to_cache` for a cache tensor."""
    fmt = kv_format(cache.dtype)
    if fmt is None:  # float caches keep the specializations they had
        return {}
    min_normal, rounder = GRID[fmt]
    return {"CACHE_FP8": True, "FP8_MAX": FP8_MAX[fmt], "MIN_NORMAL": min_normal, "SUBNORMAL_ROUNDER": rounder}


@triton.jit
def _kv_cache_write_kernel(k_ptr, v_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr,
                           num_kv_heads, block_size, stride_k_row, stride_v_row,
                           stride_kc_block, stride_kc_slot, stride_kc_head,
                           stride_vc_block, stride_vc_slot, stride_vc_head, k_scale, v_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                           CACHE_FP8: tl.constexpr = False, FP8_MAX: tl.constexpr = 448.0,
                           MIN_NORMAL: tl.constexpr = 0.0, SUBNORMAL_ROUNDER: tl.constexpr = 0.0,
                           PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    token = tl.program_id(0).to(tl.int64)
    # int64: slot * row stride overflows int32 on caches over 2**31 elements
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    block, offset = slot // block_size, slot % block_size
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # [BLOCK_HEADS]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    # broadcast the slot to a block before comparing: the interpreter rejects a
    # load mask built from a scalar bool & a block
    is_real = (tl.full([BLOCK_HEADS, 1], 0, tl.int64) + slot) >= 0  # [BLOCK_HEADS, 1]
    mask = is_real & (heads[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM)  # [BLOCK_HEADS, BLOCK_D]
    src = heads[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(k_ptr + token * stride_k_row + src, mask=mask)
    v = tl.load(v_ptr + token * stride_v_row + src, mask=mask)
    k_dst = (k_cache_ptr + block * stride_kc_block + offset * stride_kc_slot
             + heads[:, None] * stride_kc_head + d[None, :])
    v_dst = (v_cache_ptr + block * stride_vc_block + offset * stride_vc_slot
             + heads[:, None] * stride_vc_head + d[None, :])
    k = to_cache(k, k_scale, k_cache_ptr, CACHE_FP8, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)
    v = to_cache(v, v_scale, v_cache_ptr, CACHE_FP8, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)
    tl.store(k_dst, k, mask=mask)
    tl.store(v_dst, v, mask=mask)


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, *, num_kv_heads: int, head_dim: int, k_scale: float = 1.0,
                   v_scale: float = 1.0, config: dict, launcher: Launcher) -> None:
    """k, v [T, Hk*D] (rows may be strided), slot_mapping [T] int32/int64, caches [NB, BS, Hk, D] (in place;
    FP8 caches store k / k_scale, v / v_scale)."""
    assert k_cache.shape[1:] == v_cache.shape[1:] and k_cache.shape[2:] == (num_kv_heads, head_dim), \
        f"caches must be [NB, BS, {num_kv_heads}, {head_dim}]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return None
    block_heads = config["constexprs"]["BLOCK_HEADS"]
    grid = (num_tokens, cdiv(num_kv_heads, block_heads))
    launcher.launch(_kv_cache_write_kernel, grid,
                    (k, v, slot_mapping, k_cache, v_cache, num_kv_heads, k_cache.shape[1], k.stride(0), v.stride(0),
                     k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                     v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), float(k_scale), float(v_scale)),
                    constexprs={"HEAD_DIM": head_dim, "BLOCK_D": next_power_of_2(head_dim),
                                "BLOCK_HEADS": block_heads, **cache_constexprs(k_cache)},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return None


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"num_kv_heads", "head_dim"}; any BLOCK_HEADS is correct (masked)."""
    all_heads = next_power_of_2(problem["num_kv_heads"])
    block_d = next_power_of_2(problem["head_dim"])
    heads = sorted({h for h in (1, 2, 4) if h <= all_heads} | {all_heads})
    return [{"constexprs": {"BLOCK_HEADS": h}, "num_warps": w, "num_stages": 1}
            for h in heads for w in (1, 2, 4) if w == 1 or 32 * w * 4 <= h * block_d]


def default_config(problem: dict) -> dict:
    # one program per token: decode writes a handful of tokens, prefill has plenty of programs
    all_heads = next_power_of_2(problem["num_kv_heads"])
    elements = all_heads * next_power_of_2(problem["head_dim"])
    warps = 4 if elements >= 2048 else 2 if elements >= 512 else 1
    return {"constexprs": {"BLOCK_HEADS": all_heads}, "num_warps": warps, "num_stages": 1}


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel  # noqa: E402


FAMILY = KernelFamily(
    "kv_cache", config_space=config_space, default_config=default_config,
    ops={"kv_cache_write": OpKernel(kv_cache_write, lambda a, ins, phase, runtime: {
        "num_kv_heads": a["num_kv_heads"], "head_dim": a["head_dim"]})})
