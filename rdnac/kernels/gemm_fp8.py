"""FP8 GEMM family: IR op `linear_fp8` (y = Q(x) @ (fp8 W * weight_scale).T + bias, in x's dtype).

The wrapper first quantizes x with `rdnac.kernels.fp8_quant` (per token "dynamic_token", per
(token, group) "dynamic_group", or a given "static" scale). With act_scheme "prequantized" x arrives
as fp8 with its scales (from `rms_norm_quant` or `gated_act_quant`, which quantize exactly as
fp8_quant does), so that launch is skipped and the GEMMs read them as they read its output.

Kernels, one job each:
  `_fp8_gemm_kernel`       per-token/static x per-channel/per-tensor: fp8 x fp8 `tl.dot`, fp32
                           accumulation (on sm90 promoted from wgmma's narrower accumulator every
                           BLOCK_K), row scale x column scale once in the epilogue. With
                           IS_A16 ("none", a16w8) the activation is x itself and the FP8 weight is
                           cast to x's dtype in registers: the path for targets without an FP8 dot
                           (gfx1151).
  `_fp8_block_gemm_kernel` block scales (weight_scheme "block" or act_scheme "dynamic_group"): the K
                           loop steps inside one scale block at a time and adds each partial product
                           times a_scale[m, kb] * w_scale[n // bn, kb]. BLOCK_K must divide the
                           scale block's K (block_size[1], 128 in every FP8 checkpoint seen); the
                           column scale is gathered per column, so any BLOCK_N is correct, and the
                           config space offers only BLOCK_N dividing block_size[0] (one scale per tile).
                           With QUANT_A (act_scheme "dynamic_group", BLOCK_K == the group; a measured
                           choice only, offered by `rdnac tune` at decode sizes) it reads x itself and
                           quantizes each [BLOCK_M, group] tile with `_quant_fp8_kernel`'s rule, the
                           same bits, so the quant launch goes; every N tile redoes that work, cheap
                           only while M is small. With EARLY_WEIGHTS (plan-wide with PDL,
                           `runtime["early_weights"]`, pass `early_weight_loads`) each program loads
                           its first K step's weight tile and scales before `griddepcontrol.wait`:
                           weights are constants no kernel writes, so at decode they stream while the
                           kernel before (norm, RoPE, attention, activation) finishes. Same bits.
  `_fp8_splitk_reduce_kernel` SPLIT_K > 1: sums the fp32 partials [SPLIT_K, M, N] in a fixed order
                           (deterministic, no atomics, no zeroed buffer), then applies the epilogue
                           scales (epilogue kernel only) and the bias once. With SELF_REDUCE (a
                           measured choice only, see `gemm.py`) the last split of each tile does the
                           same in-kernel, bit for bit, and there is no second launch.

Config space (`config_space(problem)`; problem keys "M" (bucket label, see `gemm.m_bucket`), "N",
"K", "dtype" (x's), "has_bias", "weight_scheme", "act_scheme", "fp8_format", "block_size", and
"group" for "prequantized"; a prequantized problem gets the space of its dynamic scheme):
  decode  M <= 16 : BLOCK_M 16, GROUP_SIZE_M 1, narrow deep tiles, SPLIT_K 1/2/4/8 for large weights
  middle  M <= 64 : BLOCK_M = bucket, GROUP_SIZE_M 1, SPLIT_K 1/2/4 for large weights
  M <= 256        : BLOCK_M 64, GROUP_SIZE_M 8, BLOCK_N 64/128
  prefill M > 256 : BLOCK_M 128, GROUP_SIZE_M 8, BLOCK_N 64/128/256 (fp8 tiles take half bf16's LDS), 8 warps
BLOCK_K is 128 on the FP8-dot paths (32..128 per matrix instruction) and 64 for a16w8 above decode
(bf16 A tiles; gfx1151's wave32 VGPRs); on the block path it divides block_size[1]. Candidates are
target-agnostic; the compiler rejects those over a target's LDS or spilling, and ranks the rest.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS, FP8_MAX
from rdnac.kernels.activation import ACTIVATIONS, activate
from rdnac.kernels.fp8_quant import GRID, fp8_scale, quantize_activations, round_to_fp8_grid
from rdnac.kernels.gemm_tiles import k_split_operands, scaled_tile_store, split_k_launch, sum_splits, tile_of, tile_ranges
from rdnac.kernels.gemm_fp8_configs import _config, config_space, default_config  # noqa: F401 (the family API)
from rdnac.kernels.launch import Launcher, cdiv

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_fp8_gemm_kernel": ("N", "K", "stride_am", "stride_wn", "stride_om", "k_per_split"),
                 "_fp8_block_gemm_kernel": ("N", "K", "stride_am", "stride_wn", "stride_om", "k_per_split"),
                 "_fp8_splitk_reduce_kernel": ("N",)}

REDUCE_BLOCK = 1024
_MAX = tl.standard._elementwise_max  # tl.max is a jit function: the interpreter path cannot call it


@triton.jit
def _fp8_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, final_ptr, counter_ptr,
                     M, N, K, stride_am, stride_wn, stride_om, stride_as, stride_ws, k_per_split,
                     IS_A16: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_SIZE_M: tl.constexpr, SPLIT_K: tl.constexpr, SELF_REDUCE: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    # a: [M, K] fp8 (x itself if IS_A16); w: [N, K] fp8; a_scale[m * stride_as] (0: one scale);
    # w_scale[n * stride_ws] (0: per tensor); out: [M, N], or the fp32 workspace [SPLIT_K, M, N].
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_of(pid, M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    offs_m, offs_n, mask_m, mask_n = tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    k_begin, k_end, offs_k, a_ptrs, b_ptrs = k_split_operands(
        a_ptr + offs_m.to(tl.int64) * stride_am, w_ptr + offs_n.to(tl.int64) * stride_wn, pid_k, k_per_split, K,
        BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_left = k_end - k0  # masks the K tail of the last step
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)  # fp8: a float `other`
        if IS_A16:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")  # fp8 -> bf16/fp32 is exact
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            # [BM, BN] fp32. Hopper's FP8 wgmma adds products into the accumulator with ~14 mantissa bits
            # and Triton leaves it there across the whole loop by default on sm90 (max_num_imprecise_acc
            # 2**30): at K = 4096 outputs moved by 4 bf16 ulps. Promoting to an fp32 add every BLOCK_K
            # (as the block-scaled kernel's per-tile dot does) keeps the error at the fp32 summation's.
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (triggering at the top
        gdc_launch_dependents()  # let chains of waiting kernels crowd the SMs: 8B decode 17% slower)
    scaled_tile_store(acc, out_ptr, final_ptr, counter_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, pid, pid_k,
                      offs_m, offs_n, mask_m, mask_n, M, N, stride_om, stride_as, stride_ws,
                      not IS_A16, True, HAS_BIAS, SPLIT_K, SELF_REDUCE)


@triton.jit
def _block_step(a_ptrs, a_scale_rows, b, w_scale, mask_m, offs_k, k_left, kb, stride_ask, w_dtype, K,
                IS_A16: tl.constexpr, QUANT_A: tl.constexpr, FP8_MAX: tl.constexpr, MIN_NORMAL: tl.constexpr,
                SUBNORMAL_ROUNDER: tl.constexpr, GATED_A: tl.constexpr):
    """One K step of `_fp8_block_gemm_kernel`: x's [BM, BK] tile times the weight tile b [BK, BN], scaled
    by the step's scales (w_scale [BN] float32), as the fp32 [BM, BN] the accumulator adds. GATED_A: x's
    tile is act(gate) * up of the gate_up rows (up K columns after gate), as gated_act_quant rounds it."""
    if IS_A16:
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        partial = tl.dot(a, b.to(a.dtype), input_precision="ieee")  # [BM, BN] fp32
        step = partial * w_scale[None, :]
    elif QUANT_A:  # x's [BM, BLOCK_K == group] tile quantized here, by _quant_fp8_kernel's rule
        a_mask = mask_m[:, None] & (offs_k[None, :] < k_left)
        if GATED_A != "":  # _gated_act_quant_kernel's formulas and roundings, op for op
            gate = tl.load(a_ptrs, mask=a_mask, other=0.0)
            act = activate(gate.to(tl.float32), GATED_A).to(gate.dtype).to(tl.float32)
            up = tl.load(a_ptrs + K, mask=a_mask, other=0.0).to(tl.float32)
            xa = (act * up).to(gate.dtype).to(tl.float32)
        else:
            xa = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
        amax = tl.reduce(tl.abs(xa), 1, _MAX)  # [BM]
        a_scale = fp8_scale(amax, FP8_MAX)  # a zero group: 1, not 0/0
        v = tl.div_rn(xa, a_scale[:, None])
        a = round_to_fp8_grid(v, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER).to(w_dtype)  # see fp8_quant
        step = tl.dot(a, b) * a_scale[:, None] * w_scale[None, :]
    else:
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        a_scale = tl.load(a_scale_rows + kb * stride_ask, mask=mask_m, other=0.0).to(tl.float32)  # [BM]
        step = tl.dot(a, b) * a_scale[:, None] * w_scale[None, :]
    return step


@triton.jit
def _fp8_block_gemm_kernel(a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, final_ptr, counter_ptr,
                           M, N, K, stride_am, stride_wn, stride_om, stride_asm, stride_ask,
                           stride_wsn, stride_wsk, k_per_split,
                           IS_A16: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_SIZE_M: tl.constexpr, SPLIT_K: tl.constexpr, SELF_REDUCE: tl.constexpr,
                           QUANT_A: tl.constexpr = False, FP8_MAX: tl.constexpr = 0.0,
                           MIN_NORMAL: tl.constexpr = 0.0, SUBNORMAL_ROUNDER: tl.constexpr = 0.0,
                           PDL: tl.constexpr = False, EARLY_WEIGHTS: tl.constexpr = False,
                           GATED_A: tl.constexpr = ""):
    if PDL and not EARLY_WEIGHTS:  # programmatic dependent launch: wait for the previous kernel (the trigger
        gdc_wait()  # is after the loop)
    # a: [M, K] fp8 (x if IS_A16 or QUANT_A), a_scale[m * stride_asm + kb * stride_ask]; w: [N, K] fp8,
    # w_scale[(n // SCALE_BLOCK_N) * stride_wsn + kb * stride_wsk], kb = k // SCALE_BLOCK_K
    # (zero strides broadcast: per-token, per-channel and per-tensor scales ride along).
    # out: [M, N], or the fp32 workspace [SPLIT_K, M, N] (already scaled).
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_of(pid, M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    offs_m, offs_n, mask_m, mask_n = tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    # k_begin: a multiple of BLOCK_K, so every step lies in one scale block
    k_begin, k_end, offs_k, a_ptrs, b_ptrs = k_split_operands(
        a_ptr + offs_m.to(tl.int64) * stride_am, w_ptr + offs_n.to(tl.int64) * stride_wn, pid_k, k_per_split, K,
        BLOCK_K)
    a_scale_rows = a_scale_ptr + offs_m * stride_asm  # [BM]
    w_scale_cols = w_scale_ptr + (offs_n // SCALE_BLOCK_N) * stride_wsn  # [BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    k_loop = k_begin
    if EARLY_WEIGHTS:  # (PDL) the first K step's weight tile and scales are constants no kernel writes: they
        # load before the wait, streaming while the kernel before this one (a norm, attention...) finishes;
        # that step runs out of the loop, the same arithmetic in the same order (the same bits)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_end - k_begin) & mask_n[None, :], other=0.0)
        w_scale = tl.load(w_scale_cols + (k_begin // SCALE_BLOCK_K) * stride_wsk, mask=mask_n, other=0.0)
        if PDL:
            gdc_wait()
        acc += _block_step(a_ptrs, a_scale_rows, b, w_scale.to(tl.float32), mask_m, offs_k, k_end - k_begin,
                           k_begin // SCALE_BLOCK_K, stride_ask, w_ptr.dtype.element_ty, K, IS_A16, QUANT_A,
                           FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER, GATED_A)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        k_loop += BLOCK_K
    for k0 in range(k_loop, k_end, BLOCK_K):
        k_left = k_end - k0
        kb = k0 // SCALE_BLOCK_K  # the step's scales load in the step: a step ahead measured no faster
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)  # (BENCHMARKS.md, s14)
        w_scale = tl.load(w_scale_cols + kb * stride_wsk, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
        acc += _block_step(a_ptrs, a_scale_rows, b, w_scale, mask_m, offs_k, k_left, kb, stride_ask,
                           w_ptr.dtype.element_ty, K, IS_A16, QUANT_A, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER, GATED_A)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (triggering at the top
        gdc_launch_dependents()  # let chains of waiting kernels crowd the SMs: 8B decode 17% slower)
    # the partials are already scaled: the epilogue adds the bias only (the scale pointers are never read)
    scaled_tile_store(acc, out_ptr, final_ptr, counter_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, pid, pid_k,
                      offs_m, offs_n, mask_m, mask_n, M, N, stride_om, 0, 0, False, False, HAS_BIAS, SPLIT_K,
                      SELF_REDUCE)


@triton.jit
def _fp8_splitk_reduce_kernel(ws_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, stride_as, stride_ws,
                              HAS_A_SCALE: tl.constexpr, HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                              SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # ws: [SPLIT_K, M, N] fp32 partials -> out: [M, N] (contiguous)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat [M*N] index
    mask = offs < M * N
    acc = sum_splits(ws_ptr, offs, mask, M * N, SPLIT_K, "")
    if HAS_A_SCALE:
        acc *= tl.load(a_scale_ptr + (offs // N) * stride_as, mask=mask, other=1.0).to(tl.float32)
    if HAS_W_SCALE:
        acc *= tl.load(w_scale_ptr + (offs % N) * stride_ws, mask=mask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- wrapper


def _quant_a_constexprs(quant_a: bool, fp8_format: str) -> dict:
    if not quant_a:
        return {}
    min_normal, rounder = GRID[fp8_format]
    return dict(QUANT_A=True, FP8_MAX=FP8_MAX[fp8_format], MIN_NORMAL=min_normal, SUBNORMAL_ROUNDER=rounder)


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *rest: torch.Tensor,
               weight_scheme: str, act_scheme: str, fp8_format: str, block_size: list | None = None,
               has_bias: bool = False, group: int = 0, out_dtype: str | None = None,
               config: dict, launcher: Launcher, gated_act: str = "") -> torch.Tensor:
    """y [M, N] = Q(x [M, K]) @ (weight [N, K] fp8 * weight_scale).T (+ bias [N]), in x's dtype.

    rest = (input_scale [1] if act_scheme == "static", x_scale [M, G] if "prequantized", bias [N] if
    has_bias), as the IR reference. Prequantized: x is fp8, G = 1 (group 0) or cdiv(K, group), and
    the output is `out_dtype`. `gated_act` (an activation; `gated_act_linear_fp8` only, act_scheme
    "dynamic_group", the config's BLOCK_K the group): x is gate_up [M, 2K] and the GEMM quantizes
    act(gate) * up itself, QUANT_A's way."""
    rest = list(rest)
    is_prequantized = act_scheme == "prequantized"
    input_scale = rest.pop(0) if act_scheme == "static" else None
    x_scale = rest.pop(0) if is_prequantized else None
    bias = rest.pop(0) if has_bias else None
    assert not rest, f"linear_fp8: {len(rest)} unexpected extra inputs"
    M, K = x.shape[0], weight.shape[1]
    N = weight.shape[0]
    assert x.shape[1] == (2 * K if gated_act else K), f"linear_fp8: x must be [M, {K}] (gate_up: [M, {2 * K}])"
    assert weight.shape == (N, K), f"linear_fp8: weight must be [N, {K}]; got {tuple(weight.shape)}"
    assert weight.dtype == FORMATS[fp8_format], \
        f"linear_fp8: an {fp8_format} weight must be {FORMATS[fp8_format]} (view uint8 bits); got {weight.dtype}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "linear_fp8: x and weight need unit stride along K"
    assert bias is None or tuple(bias.shape) == (N,), f"linear_fp8: bias must be [{N}]"
    assert act_scheme in ("none", "dynamic_token", "dynamic_group", "static", "prequantized"), \
        f"unknown act_scheme {act_scheme!r}"
    out = torch.empty((M, N), dtype=getattr(torch, out_dtype) if out_dtype else x.dtype, device=x.device)
    if M == 0:
        return out
    is_a16 = act_scheme == "none"
    c = config["constexprs"]
    # QUANT_A (a measured choice at decode sizes, see the module docstring): the block GEMM quantizes
    # x's groups itself, the bits _quant_fp8_kernel would write, and there is no quant launch.
    quant_a = act_scheme == "dynamic_group" and (bool(c.get("QUANT_A", False)) or bool(gated_act))
    if not is_prequantized:
        group = block_size[1] if act_scheme == "dynamic_group" else 0
    is_block = weight_scheme == "block" or group > 0
    if is_prequantized:
        assert x.dtype == FORMATS[fp8_format], f"linear_fp8: prequantized x must be {FORMATS[fp8_format]}"
        assert tuple(x_scale.shape) == (M, cdiv(K, group) if group else 1) and x_scale.stride(1) == 1, \
            f"linear_fp8: x_scale must be [{M}, G] for group {group}; got {tuple(x_scale.shape)}"
        assert weight_scheme != "block" or not group or group == block_size[1], \
            f"linear_fp8: activation group {group} must equal the weight's scale block K {block_size[1]}"
        a, a_scale = x, x_scale
    elif is_a16 or quant_a:
        assert not quant_a or c["BLOCK_K"] == group, f"linear_fp8: QUANT_A needs BLOCK_K == the group {group}"
        a, a_scale = x, x
    else:
        a, a_scale = quantize_activations(x, input_scale, fp8_format, group, launcher=launcher)

    tiles = split_k_launch(config, out, M, N, K)
    split_k, self_reduce = tiles.split_k, tiles.self_reduce
    bias_arg = bias if has_bias else weight_scale  # never read when HAS_BIAS is False
    flags = dict(tiles.constexprs, IS_A16=is_a16, HAS_BIAS=has_bias and (split_k == 1 or self_reduce))
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    head = (a, a_scale, weight, weight_scale, bias_arg, tiles.target, out, tiles.counters, M, N, K, a.stride(0),
            weight.stride(0), tiles.stride_target)
    # a_scale is [M, G] (dynamic), [1] (static) or unused (a16w8): zero strides broadcast it.
    stride_asm = 0 if is_a16 or quant_a or input_scale is not None else a_scale.stride(0)
    if is_block:
        if weight_scheme == "block":
            scale_bn, scale_bk = block_size
            stride_wsn, stride_wsk = weight_scale.stride(0), weight_scale.stride(1)
        else:  # per-channel / per-tensor weight under per-group activations
            scale_bn, scale_bk = 1, group
            stride_wsn, stride_wsk = (weight_scale.stride(0) if weight_scheme == "channel" else 0), 0
        assert scale_bk % c["BLOCK_K"] == 0, \
            f"linear_fp8: BLOCK_K {c['BLOCK_K']} must divide the scale block's K {scale_bk}"
        stride_ask = 1 if group else 0
        launcher.launch(_fp8_block_gemm_kernel, tiles.grid,
                        (*head, stride_asm, stride_ask, stride_wsn, stride_wsk, tiles.k_per_split),
                        constexprs=dict(flags, SCALE_BLOCK_N=scale_bn, SCALE_BLOCK_K=scale_bk,
                                        **_quant_a_constexprs(quant_a, fp8_format),
                                        **({"GATED_A": gated_act} if gated_act else {})), **launch)
        has_a_scale = has_w_scale = False
    else:
        assert weight_scheme in ("channel", "tensor"), f"unknown FP8 weight scheme {weight_scheme!r}"
        stride_ws = weight_scale.stride(0) if weight_scheme == "channel" else 0  # [N] or [N, 1]
        launcher.launch(_fp8_gemm_kernel, tiles.grid, (*head, stride_asm, stride_ws, tiles.k_per_split),
                        constexprs=flags, **launch)
        has_a_scale, has_w_scale = not is_a16, True
    if split_k > 1 and not self_reduce:
        launcher.launch(_fp8_splitk_reduce_kernel, (cdiv(M * N, REDUCE_BLOCK),),
                        (tiles.target, a_scale, weight_scale, bias_arg, out, M, N, stride_asm,
                         0 if is_block else stride_ws),
                        constexprs=dict(HAS_A_SCALE=has_a_scale, HAS_W_SCALE=has_w_scale, HAS_BIAS=has_bias,
                                        SPLIT_K=split_k, BLOCK=REDUCE_BLOCK),
                        num_warps=4, num_stages=1)
    return out


def gated_act_linear_fp8(gate_up: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *rest: torch.Tensor,
                         act: str, weight_scheme: str, fp8_format: str, group: int, block_size: list | None = None,
                         has_bias: bool = False, out_dtype: str | None = None, config: dict,
                         launcher: Launcher) -> torch.Tensor:
    """IR op `gated_act_linear_fp8`: y [M, N] = linear_fp8(gated_act_quant(gate_up [M, 2I])) with weight [N, I].

    At decode sizes (M <= DECODE_MAX_M) with BLOCK_K == group, one launch: the block GEMM computes and
    quantizes act(gate) * up per K step (`_block_step`, GATED_A), the bits of the unfused pair, with no
    gated_act_quant launch and no fp8 round trip. Otherwise the pair runs as two launches: every N tile
    recomputing the activation costs more than it saves once a step holds many tokens."""
    from rdnac.kernels import activation_quant
    from rdnac.kernels.gemm import DECODE_MAX_M

    assert act in ACTIVATIONS and group > 0, (act, group)
    linear = dict(weight_scheme=weight_scheme, fp8_format=fp8_format, block_size=block_size, has_bias=has_bias,
                  out_dtype=out_dtype or str(gate_up.dtype).removeprefix("torch."), config=config, launcher=launcher)
    if gate_up.shape[0] <= DECODE_MAX_M and config["constexprs"]["BLOCK_K"] == group:
        return linear_fp8(gate_up, weight, weight_scale, *rest, act_scheme="dynamic_group", gated_act=act,
                          **{**linear, "block_size": block_size or [1, group]})
    problem = {"I": weight.shape[1], "group": group, "M": gate_up.shape[0]}
    q, scale = activation_quant.gated_act_quant(gate_up, act=act, fp8_format=fp8_format, group=group,
                                                config=activation_quant.default_config(problem), launcher=launcher)
    return linear_fp8(q, weight, weight_scale, scale, *rest, act_scheme="prequantized", group=group, **linear)


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"M": ins[0].shape[0], "N": ins[1].shape[0], "K": ins[1].shape[1],
            "dtype": a.get("out_dtype") or dtype_name(ins[0]),
            "has_bias": a.get("has_bias", False), "weight_scheme": a["weight_scheme"],
            "act_scheme": a["act_scheme"], "fp8_format": a["fp8_format"],
            "block_size": a.get("block_size"), "group": a.get("group", 0)}


def _gated_problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    """The problem of the GEMM it runs: the prequantized down projection's (measured as dynamic_group)."""
    return _problem({**a, "act_scheme": "prequantized"}, ins, phase, runtime)


FAMILY = KernelFamily("gemm_fp8", config_space=config_space, default_config=default_config,
                      tuning_key=("N", "K", "dtype", "weight_scheme", "act_scheme", "fp8_format", "block_size"),
                      ops={"linear_fp8": OpKernel(linear_fp8, _problem),
                           "gated_act_linear_fp8": OpKernel(gated_act_linear_fp8, _gated_problem)})
