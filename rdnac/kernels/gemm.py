"""GEMM family: IR ops `linear` (y = x @ w.T + bias) and `logits` (gathered rows @ w.T, softcap, fp32 out).

One tiled kernel serves both ops: `x` [M, K] (or the rows `x[logits_indices]`
for `logits`) times `w` [N, K] (PyTorch's row-major layout, no transpose on the
host), fp32 accumulation, bias / softcap applied once in the epilogue.
bf16, fp16 and fp32 inputs; fp32 dots use IEEE precision (never tf32).

Split-K (SPLIT_K > 1) lets few output tiles still fill the GPU at decode:
program (tile, s) reduces K range s into an fp32 workspace [SPLIT_K, M, N], and
a second kernel sums the SPLIT_K partials in a fixed order (deterministic, no
atomics, no zeroed buffer), then adds the bias / applies the softcap and casts.
With SELF_REDUCE (a config choice, offered to measurement by `rdnac tune`, never
picked by the cost model) there is no second launch: each program counts its
arrival on the tile's counter (an atomic, acquire-release at device scope) and
the last to arrive sums the partials in the same fixed order, so the output is
bit for bit the two-kernel one, then sets the counter back to 0. The counters
are a persistent zeroed int32 buffer per device (`gemm_tiles.split_k_counters`); launches
on one stream run one after another, so one buffer serves every GEMM.
Without split-K the kernel loops over all of K with masks, so no config can
truncate K.

With constexpr GATED (an activation name: `gemm_gated`'s WIDE configs) the
kernel is the MLP's merged gate/up GEMM with its activation: w is [N = 2I, K]
(gate rows, then up rows, unchanged), tile column c reads weight row
c // 2 + (c % 2) * I, so a tile holds BLOCK_N / 2 matched (gate, up) column
pairs, and the epilogue stores act(gate) * up [M, I] rounded as
`activation.gated_act` rounds: the unfused pair's bits for the same config,
without the [M, 2I] round trip or the second launch. Split-K only with
SELF_REDUCE (the activation needs the whole K sum; the last split holds it).

Config space, per M bucket (`m_bucket`; buckets M <= 1, 2, 4, 8, 16, 32, 64,
128, 256 and M > 256, labelled by their upper bound, the last one by
`LARGE_M` = 2048, a typical prefill chunk; a bucket's configs are correct for
every M):
  decode  M <= 16 : BLOCK_M 16 (the smallest tl.dot), GROUP_SIZE_M 1,
                    (BLOCK_N, BLOCK_K) narrow and deep, SPLIT_K 1/2/4/8 when N*K is large
  middle  M <= 64 : BLOCK_M = bucket, GROUP_SIZE_M 1, SPLIT_K 1/2/4 when N*K is large
  M <= 256        : BLOCK_M 64, GROUP_SIZE_M 8, BLOCK_N 64/128
  prefill M > 256 : BLOCK_M 128, GROUP_SIZE_M 8, BLOCK_N 64/128/256, 8 warps
`config_space(problem)` takes {"M": bucket label, "N", "K", "dtype", "has_bias"};
`logits` uses the same space with N = vocab, K = hidden, M = number of rows R.
Candidates are target-agnostic; the compiler rejects those that exceed a
target's LDS and ranks the rest (`rdnac.compiler.cost_model`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.activation import activate
from rdnac.kernels.gemm_tiles import (k_split_operands, split_k_counters, split_k_launch,  # noqa: F401 (split_k_counters:
                                     splitk_partials, sum_splits, tile_of, tile_ranges)  # other modules import it here)
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# Shape ints fixed by the weights (never token counts): binaries specialize on their divisibility by 16.
AOT_DIVISIBLE = {"_gemm_kernel": ("N", "K", "stride_xm", "stride_wn", "stride_om", "k_per_split"),
                 "_splitk_reduce_kernel": ("N",)}

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LARGE_M = 2048  # label of the M > 256 bucket
DECODE_MAX_M = 16
# Split-K is offered only when the weight is big enough that its read time
# beats the second launch (about 1M elements = 2 MB of bf16).
SPLIT_K_MIN_NK = 1 << 20
REDUCE_BLOCK = 1024


def m_bucket(M: int) -> int:
    """The bucket label for M tokens: the smallest bound >= M, or LARGE_M above 256."""
    for bound in M_BUCKETS:
        if M <= bound:
            return bound
    return LARGE_M


@triton.jit
def _gemm_kernel(x_ptr, idx_ptr, w_ptr, bias_ptr, out_ptr, final_ptr, counter_ptr,
                 M, N, K, stride_xm, stride_wn, stride_om, k_per_split, softcap,
                 HAS_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_SIZE_M: tl.constexpr, SPLIT_K: tl.constexpr, SELF_REDUCE: tl.constexpr,
                 PDL: tl.constexpr = False, GATED: tl.constexpr = ""):
    # x: [*, K] (rows idx[m] if HAS_GATHER else m); w: [N, K]; out: [M, N],
    # or the fp32 workspace [SPLIT_K, M, N] when SPLIT_K > 1. SELF_REDUCE: final [M, N]
    # (contiguous) gets the sum; counter[pid] counts the tile's finished splits (0 between launches).
    # GATED (an activation name): w is a merged [N = 2I, K] gate/up weight; tile column c computes
    # weight row c // 2 + (c % 2) * I (gate row j at column 2j, up row j at 2j + 1) and the [M, I]
    # output (final when SELF_REDUCE) gets act(gate) * up.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_of(pid, M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    offs_m, offs_n, mask_m, mask_n = tile_ranges(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    if GATED != "":  # even tile columns read gate rows, odd ones the matching up rows: no weight re-layout
        w_rows = offs_n // 2 + (offs_n % 2) * (N // 2)  # [BN]
    else:
        w_rows = offs_n
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    if HAS_GATHER:
        rows = tl.load(idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        rows = offs_m.to(tl.int64)
    x_rows = x_ptr + rows * stride_xm  # [BM] row pointers
    # int64: vocab * hidden can pass 2**31 elements.
    w_cols = w_ptr + w_rows.to(tl.int64) * stride_wn  # [BN] row pointers of w
    k_begin, k_end, offs_k, a_ptrs, b_ptrs = k_split_operands(x_rows, w_cols, pid_k, k_per_split, K, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # tl.zeros is a jit function
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_left = k_end - k0  # masks the K tail of the last step
        # other=0, not 0.0: the interpreter converts a float `other` to bf16 bit by bit on every load.
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, input_precision="ieee")  # [BM, BN]; ieee: no tf32 for fp32 inputs
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (triggering at the top
        gdc_launch_dependents()  # let chains of waiting kernels crowd the SMs: 8B decode 17% slower)
    out_offs = offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if GATED != "":  # the [M, I] output's columns of this tile: one per (gate, up) pair
        offs_i = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # [BN/2]
        gated_mask = mask_m[:, None] & (offs_i < N // 2)[None, :]
    # The tile's whole-K value `total` and where it goes: this program's accumulator without split-K; with
    # SELF_REDUCE the last split to arrive sums the partials; otherwise the reduce kernel finishes the tile.
    if SPLIT_K == 1:
        total = acc
        dst_ptr, dst_stride = out_ptr, stride_om
        dst_tile = out_ptr + out_offs  # [BM, BN] pointers of the ungated store
        is_last = True
    else:
        is_last, total = splitk_partials(out_ptr, counter_ptr, pid, pid_k, acc, out_offs, out_mask, M * N,
                                         SPLIT_K, SELF_REDUCE)
        dst_ptr = final_ptr  # [M, N] or, gated, [M, I]: contiguous
        dst_stride = N // 2 if GATED != "" else N
        dst_tile = final_ptr + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1 or SELF_REDUCE:
        if is_last:  # the epilogue, once per tile
            if HAS_BIAS:
                total += tl.load(bias_ptr + w_rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_SOFTCAP:
                # softcap * tanh(total / softcap), tanh written out: no libdevice in portable Triton.
                t = tl.exp(-2.0 * tl.abs(total / softcap))
                tanh_abs = (1.0 - t) / (1.0 + t)
                total = softcap * tl.where(total < 0, -tanh_abs, tanh_abs)
            if GATED != "":
                # Round gate and up as the unfused GEMM stores gate_up, then activation._gated_act_kernel's
                # formulas (activation.activate), so the output is the unfused pair's bit for bit.
                act_dtype = dst_ptr.dtype.element_ty
                gate, up = tl.split(tl.reshape(total, (BLOCK_M, BLOCK_N // 2, 2)))  # [BM, BN/2] each
                gate = gate.to(act_dtype).to(tl.float32)
                up = up.to(act_dtype).to(tl.float32)
                act = activate(gate, GATED)
                act = act.to(act_dtype).to(tl.float32)
                tl.store(dst_ptr + offs_m[:, None] * dst_stride + offs_i[None, :], (act * up).to(act_dtype),
                         mask=gated_mask)
            else:
                tl.store(dst_tile, total.to(dst_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, M, N, softcap,
                          HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                          SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    # ws: [SPLIT_K, M, N] fp32 partials -> out: [M, N] (contiguous)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat [M*N] index
    mask = offs < M * N
    acc = sum_splits(ws_ptr, offs, mask, M * N, SPLIT_K, "")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = tl.exp(-2.0 * tl.abs(acc / softcap))
        tanh_abs = (1.0 - t) / (1.0 + t)
        acc = softcap * tl.where(acc < 0, -tanh_abs, tanh_abs)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- wrappers


def _check_operands(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and weight.dim() == 2, f"{op}: x and weight must be 2-D; got {tuple(x.shape)}, {tuple(weight.shape)}"
    assert x.shape[1] == weight.shape[1], f"{op}: x [*, K] and weight [N, K] disagree on K: {tuple(x.shape)} vs {tuple(weight.shape)}"
    assert x.dtype == weight.dtype, f"{op}: x and weight dtypes differ: {x.dtype} vs {weight.dtype}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, f"{op}: x and weight need unit stride along K"


def _launch_gemm(x, idx, weight, bias, out, M, softcap, *, config, launcher, is_gather, gated=""):
    """Launch the GEMM (and, with SPLIT_K > 1 and no SELF_REDUCE, its reduce) writing `out` [M, N].
    With `gated` (an activation name) weight is a merged gate/up [N = 2I, K] and `out` is [M, I]."""
    N, K = weight.shape
    c = config["constexprs"]
    block_n, split_k = c["BLOCK_N"], c["SPLIT_K"]
    self_reduce = bool(c.get("SELF_REDUCE", False)) and split_k > 1
    if gated:
        assert not is_gather and softcap == 0, "a gated GEMM has no row gather and no softcap"
        assert N % 2 == 0 and block_n % 2 == 0, f"a gated GEMM pairs columns: N={N}, BLOCK_N={block_n} must be even"
        assert split_k == 1 or self_reduce, (
            f"a gated GEMM requires SPLIT_K 1 or SELF_REDUCE (the activation needs the whole K sum, which only "
            f"the last split of a self-reducing tile holds); got SPLIT_K={split_k} without SELF_REDUCE in {config}; "
            f"add SELF_REDUCE or use SPLIT_K 1")
    if M == 0:
        return out
    has_bias, has_softcap = bias is not None, softcap > 0
    bias_arg = bias if has_bias else weight  # never read when HAS_BIAS is False
    idx_arg = idx if is_gather else weight  # never read when HAS_GATHER is False
    tiles = split_k_launch(config, out, M, N, K)
    # Without split-K the program's sum is the tile's; with it the epilogue runs only in the last split of
    # SELF_REDUCE, or else in the reduce kernel.
    has_epilogue = split_k == 1 or self_reduce
    launcher.launch(_gemm_kernel, tiles.grid,
                    (x, idx_arg, weight, bias_arg, tiles.target, out, tiles.counters, M, N, K, x.stride(0),
                     weight.stride(0), tiles.stride_target, tiles.k_per_split, float(softcap)),
                    constexprs=dict(tiles.constexprs, HAS_GATHER=is_gather, HAS_BIAS=has_bias and has_epilogue,
                                    HAS_SOFTCAP=has_softcap and has_epilogue, **({"GATED": gated} if gated else {})),
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    if not has_epilogue:
        launcher.launch(_splitk_reduce_kernel, (cdiv(M * N, REDUCE_BLOCK),),
                        (tiles.target, bias_arg, out, M, N, float(softcap)),
                        constexprs=dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, SPLIT_K=split_k,
                                        BLOCK=REDUCE_BLOCK),
                        num_warps=4, num_stages=1)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: dict, launcher: Launcher) -> torch.Tensor:
    """y [M, N] = x [M, K] @ weight [N, K].T + bias [N], in x's dtype (fp32 accumulation)."""
    _check_operands("linear", x, weight)
    M, N = x.shape[0], weight.shape[0]
    assert bias is None or tuple(bias.shape) == (N,), f"linear: bias must be [{N}]; got {tuple(bias.shape)}"
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)  # [M, N]
    return _launch_gemm(x, None, weight, bias, out, M, 0.0, config=config, launcher=launcher, is_gather=False)


def logits(x: torch.Tensor, logits_indices: torch.Tensor, weight: torch.Tensor, *, softcap: float = 0.0,
           config: dict, launcher: Launcher) -> torch.Tensor:
    """out [R, V] float32 = softcap(x[logits_indices] [R, H] @ weight [V, H].T); rows gathered in-kernel."""
    _check_operands("logits", x, weight)
    assert logits_indices.dim() == 1, f"logits: logits_indices must be [R]; got {tuple(logits_indices.shape)}"
    R, V = logits_indices.shape[0], weight.shape[0]
    out = torch.empty((R, V), dtype=torch.float32, device=x.device)  # [R, V]
    return _launch_gemm(x, logits_indices, weight, None, out, R, softcap, config=config, launcher=launcher,
                        is_gather=True)


# ---------------------------------------------------------------- configs


def _config(block_m: int, block_n: int, block_k: int, group_size_m: int, split_k: int,
            num_warps: int, num_stages: int) -> dict:
    return {"constexprs": {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
                           "GROUP_SIZE_M": group_size_m, "SPLIT_K": split_k},
            "num_warps": num_warps, "num_stages": num_stages}


def _split_k_options(N: int, K: int, block_k: int, max_split: int) -> list[int]:
    """SPLIT_K values worth offering: 1, plus powers of two when the weight is large,
    each split keeps at least two BLOCK_K steps, and no split is empty."""
    options = [1]
    if N * K < SPLIT_K_MIN_NK:
        return options
    for split in (2, 4, 8, 16):
        k_per_split = cdiv(cdiv(K, split), block_k) * block_k  # as split_k_launch computes it
        if split <= max_split and k_per_split >= 2 * block_k and cdiv(K, k_per_split) == split:
            options.append(split)
    return options


def _clamp_block_k(block_k: int, K: int) -> int:
    # A BLOCK_K far beyond K only adds masked lanes; 16 is the smallest tl.dot K.
    return max(16, min(block_k, next_power_of_2(K)))


def config_space(problem: dict) -> list[dict]:
    """Candidates for {"M": bucket label (see m_bucket), "N", "K", "dtype", "has_bias"}.

    dtype and has_bias do not change the candidates (the kernel handles both);
    they are part of the problem so a cost model can weigh them."""
    M, N, K = m_bucket(problem["M"]), problem["N"], problem["K"]
    candidates: list[dict] = []
    if M <= DECODE_MAX_M:
        # Decode: one 16-row tile; narrow N tiles and deep K steps keep many
        # programs streaming the weight, split-K adds more when N is small.
        for block_n, block_k in ((32, 256), (64, 64), (64, 128), (128, 64), (128, 128)):
            block_k = _clamp_block_k(block_k, K)
            for split_k in _split_k_options(N, K, block_k, max_split=8):
                candidates.append(_config(16, block_n, block_k, 1, split_k, 4, 2))
        candidates.append(_config(16, 64, _clamp_block_k(128, K), 1, 1, 4, 3))
    elif M <= 64:
        # 8 warps too: at 4 warps the 64x64 tile holds ~255 registers per thread and spills on sm90/gfx1201.
        for block_n, block_k in ((64, 64), (64, 128), (128, 64)):
            block_k = _clamp_block_k(block_k, K)
            for split_k in _split_k_options(N, K, block_k, max_split=4):
                for num_warps in (4, 8):
                    candidates.append(_config(M, block_n, block_k, 1, split_k, num_warps, 2))
    elif M <= 256:
        for block_n in (64, 128):
            for num_stages in (2, 3):
                for num_warps in (4, 8):  # 8: unaligned K (no vectorized loads) needs the registers
                    candidates.append(_config(64, block_n, _clamp_block_k(64, K), 8, 1, num_warps, num_stages))
    else:
        for block_n, block_k in ((64, 64), (128, 32), (128, 64), (256, 64)):
            for num_stages in (2, 3):
                candidates.append(_config(128, block_n, _clamp_block_k(block_k, K), 8, 1, 8, num_stages))
    return candidates


def default_config(problem: dict) -> dict:
    """A safe pick from config_space without a target: the compiler normally ranks the space instead.

    Decode splits K until roughly 64 programs exist (the smallest GPUs rdnac
    targets have 40-64 compute units)."""
    M, N, K = m_bucket(problem["M"]), problem["N"], problem["K"]
    if M <= 64:
        block_m = 16 if M <= DECODE_MAX_M else M
        block_k = _clamp_block_k(128 if M <= DECODE_MAX_M else 64, K)
        num_tiles = cdiv(N, 64)
        options = _split_k_options(N, K, block_k, max_split=8 if M <= DECODE_MAX_M else 4)
        split_k = next((s for s in options if num_tiles * s >= 64), options[-1])
        return _config(block_m, 64, block_k, 1, split_k, 4, 2)
    if M <= 256:
        return _config(64, 64, _clamp_block_k(64, K), 8, 1, 4, 2)
    return _config(128, 128, _clamp_block_k(32, K), 8, 1, 8, 2)  # 32 KiB of LDS: fits every target


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _linear_problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"M": ins[0].shape[0], "N": ins[1].shape[0], "K": ins[1].shape[1], "dtype": dtype_name(ins[0]),
            "has_bias": len(ins) == 3}


def _logits_problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:  # M: the gathered rows
    return {"M": ins[1].shape[0], "N": ins[2].shape[0], "K": ins[2].shape[1], "dtype": dtype_name(ins[0]),
            "has_bias": False}


FAMILY = KernelFamily("gemm", config_space=config_space, default_config=default_config, cost_model="gemm",
                      tuning_key=("N", "K", "dtype"),
                      ops={"linear": OpKernel(linear, _linear_problem), "logits": OpKernel(logits, _logits_problem)})
