"""INT8 W8A8 GEMM family: IR op `linear_int8` (y = Q(x) @ (int8 W * weight_scale).T + bias, in x's dtype).

The FP8 GEMM family's structure with int8 operands: the wrapper quantizes x per token with
`rdnac.kernels.fp8_quant` (format "int8": scale = amax / 127, values rounded to integers, ties to even),
unless x arrives prequantized from `rms_norm_quant` / `gated_act_quant` (the same rule, fused), and
`_int8_gemm_kernel` multiplies int8 x int8 into an int32 accumulator with the target's integer matrix
instructions (v_wmma_i32_16x16x16_iu8 on gfx1201/gfx1151, v_mfma_i32_*_i8 on gfx942/gfx950, wgmma
s32.s8.s8 on sm90). The integer sum is exact whatever the order; the row scale x column scale (and the
bias) apply once, in fp32, in the epilogue. SPLIT_K > 1 stores each split's exact int32 sum as an fp32
partial and reuses the FP8 family's reduce kernel (or the last split, SELF_REDUCE) for the epilogue.

Config space and default: the FP8 family's (`gemm_fp8_configs`; int8 tiles take the bytes of fp8 ones,
and the integer dots' K steps, 16 to 64, divide its BLOCK_K of 32 and up). Problem keys: those of
`linear_fp8` with fp8_format "int8".
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.fp8_quant import quantize_activations
from rdnac.kernels.gemm_fp8 import REDUCE_BLOCK, _fp8_splitk_reduce_kernel
from rdnac.kernels.gemm_fp8_configs import config_space, default_config
from rdnac.kernels.gemm_tiles import k_split_operands, scaled_tile_store, split_k_launch, tile_of, tile_ranges
from rdnac.kernels.launch import Launcher, cdiv

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_int8_gemm_kernel": ("N", "K", "stride_am", "stride_wn", "stride_om", "k_per_split")}


@triton.jit
def _int8_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, final_ptr, counter_ptr,
                      M, N, K, stride_am, stride_wn, stride_om, stride_as, stride_ws, k_per_split,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_SIZE_M: tl.constexpr, SPLIT_K: tl.constexpr, SELF_REDUCE: tl.constexpr,
                      PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    # a: [M, K] int8, a_scale[m * stride_as]; w: [N, K] int8, w_scale[n * stride_ws] (0: per tensor);
    # out: [M, N], or the fp32 workspace [SPLIT_K, M, N].
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_of(pid, M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    offs_m, offs_n, mask_m, mask_n = tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    k_begin, k_end, offs_k, a_ptrs, b_ptrs = k_split_operands(
        a_ptr + offs_m.to(tl.int64) * stride_am, w_ptr + offs_n.to(tl.int64) * stride_wn, pid_k, k_per_split, K,
        BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_left = k_end - k0  # masks the K tail of the last step
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # [BM, BN] int32: exact (|sum| <= 127 * 127 * K); Triton
        # 3.6 requires out_dtype to name the int32 accumulator (3.9 infers it from acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled
        gdc_launch_dependents()
    # scales and bias once, in fp32 (the integer sum is exact), in _fp8_splitk_reduce_kernel's order
    scaled_tile_store(acc.to(tl.float32), out_ptr, final_ptr, counter_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                      pid, pid_k, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, stride_as, stride_ws,
                      True, True, HAS_BIAS, SPLIT_K, SELF_REDUCE)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *rest: torch.Tensor,
                weight_scheme: str, act_scheme: str, has_bias: bool = False, group: int = 0,
                out_dtype: str | None = None, config: dict, launcher: Launcher) -> torch.Tensor:
    """y [M, N] = Q(x [M, K]) @ (weight [N, K] int8 * weight_scale).T (+ bias [N]), in x's dtype (or
    `out_dtype` when prequantized). rest = (x_scale [M, 1] if "prequantized", bias [N] if has_bias)."""
    rest = list(rest)
    is_prequantized = act_scheme == "prequantized"
    x_scale = rest.pop(0) if is_prequantized else None
    bias = rest.pop(0) if has_bias else None
    assert not rest, f"linear_int8: {len(rest)} unexpected extra inputs"
    assert act_scheme in ("dynamic_token", "prequantized"), f"linear_int8: unknown act_scheme {act_scheme!r}"
    assert weight_scheme in ("channel", "tensor"), f"linear_int8: unknown weight_scheme {weight_scheme!r}"
    assert not group, f"linear_int8: activations are per token (group 0); got group {group}"
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape == (N, K) and weight.dtype == torch.int8, \
        f"linear_int8: weight must be int8 [N, {K}]; got {weight.dtype} {tuple(weight.shape)}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "linear_int8: x and weight need unit stride along K"
    assert bias is None or tuple(bias.shape) == (N,), f"linear_int8: bias must be [{N}]"
    out = torch.empty((M, N), dtype=getattr(torch, out_dtype) if out_dtype else x.dtype, device=x.device)
    if M == 0:
        return out
    if is_prequantized:
        assert x.dtype == torch.int8, f"linear_int8: prequantized x must be int8; got {x.dtype}"
        assert tuple(x_scale.shape) == (M, 1), f"linear_int8: x_scale must be [{M}, 1]; got {tuple(x_scale.shape)}"
        a, a_scale = x, x_scale
    else:
        a, a_scale = quantize_activations(x, None, "int8", 0, launcher=launcher)
    tiles = split_k_launch(config, out, M, N, K)
    split_k, self_reduce = tiles.split_k, tiles.self_reduce
    bias_arg = bias if has_bias else weight_scale  # never read when HAS_BIAS is False
    stride_ws = weight_scale.stride(0) if weight_scheme == "channel" else 0  # [N] or [1]
    launcher.launch(_int8_gemm_kernel, tiles.grid,
                    (a, a_scale, weight, weight_scale, bias_arg, tiles.target, out, tiles.counters,
                     M, N, K, a.stride(0), weight.stride(0), tiles.stride_target, a_scale.stride(0), stride_ws,
                     tiles.k_per_split),
                    constexprs=dict(tiles.constexprs, HAS_BIAS=has_bias and (split_k == 1 or self_reduce)),
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    if split_k > 1 and not self_reduce:
        launcher.launch(_fp8_splitk_reduce_kernel, (cdiv(M * N, REDUCE_BLOCK),),
                        (tiles.target, a_scale, weight_scale, bias_arg, out, M, N, a_scale.stride(0), stride_ws),
                        constexprs=dict(HAS_A_SCALE=True, HAS_W_SCALE=True, HAS_BIAS=has_bias,
                                        SPLIT_K=split_k, BLOCK=REDUCE_BLOCK),
                        num_warps=4, num_stages=1)
    return out


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    """linear_fp8's problem with fp8_format "int8", so the FP8 family's config space reads it as it is."""
    return {"M": ins[0].shape[0], "N": ins[1].shape[0], "K": ins[1].shape[1],
            "dtype": a.get("out_dtype") or dtype_name(ins[0]), "has_bias": a.get("has_bias", False),
            "weight_scheme": a["weight_scheme"], "act_scheme": a["act_scheme"], "fp8_format": "int8",
            "block_size": None, "group": 0}


FAMILY = KernelFamily("gemm_int8", config_space=config_space, default_config=default_config,
                      tuning_key=("N", "K", "dtype", "weight_scheme", "act_scheme"),
                      ops={"linear_int8": OpKernel(linear_int8, _problem)})
