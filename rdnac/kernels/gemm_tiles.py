"""The tile machinery every GEMM kernel of the library shares (gemm, gemm_fp8, gemm_int8, gemm_gated).

A GEMM program owns one [BLOCK_M, BLOCK_N] output tile and, with split-K, one K range of it:
`tile_of` orders the tiles, `tile_ranges` gives a tile's rows, columns and bounds masks,
`k_split_operands` its K range and first step's operand pointers. Split-K partials go through
`splitk_partials` (a [SPLIT_K, M, N] fp32 workspace; with SELF_REDUCE the last split to arrive sums
them with `sum_splits`, in the reduce kernels' fixed order). `scaled_tile_store` is the epilogue of the
quantized GEMMs: row scale x column scale, then bias, once per tile, the order of their reduce kernel.
On the host, `split_k_launch` turns a config into the grid, constexprs, target and counters all the
GEMM wrappers launch with; `split_k_counters` holds SELF_REDUCE's persistent arrival counters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rdnac.kernels.launch import cdiv


@triton.jit
def tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """(pid_m, pid_n): the output tile of program `pid`. GROUP_SIZE_M 1: row-major order, neighbouring
    programs share the x rows; else grouped order: GROUP_SIZE_M row tiles reuse each weight panel from L2.
    Every GEMM kernel of the library orders its tiles here."""
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # tl.cdiv is a jit function of Triton's: inlined
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    if GROUP_SIZE_M == 1:
        return pid // num_pid_n, pid % num_pid_n
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_SIZE_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_SIZE_M)
    return first_pid_m + (pid % num_pid_in_group) % group_size_m, (pid % num_pid_in_group) // group_size_m


@triton.jit
def tile_ranges(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (pid_m, pid_n)'s rows offs_m [BM], columns offs_n [BN] and their masks (< M, < N)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def k_split_operands(a_rows, w_rows, pid_k, k_per_split, K, BLOCK_K: tl.constexpr):
    """Split pid_k's K range [k_begin, k_end) (k_begin a multiple of BLOCK_K; the last split stops at K),
    offs_k [BK], and the first K step's operand pointers: a [BM, BK] from the row pointers a_rows [BM],
    b [BK, BN] from the weight row pointers w_rows [BN], K contiguous: the K-major B operand the
    wgmma/MFMA/WMMA instructions want, no transpose. Each step advances both by BLOCK_K."""
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    a_ptrs = a_rows[:, None] + (k_begin + offs_k)[None, :]  # [BM, BK]
    b_ptrs = w_rows[None, :] + (k_begin + offs_k)[:, None]  # [BK, BN]
    return k_begin, k_end, offs_k, a_ptrs, b_ptrs


@triton.jit
def sum_splits(ws_ptr, offs, mask, MN, SPLIT_K: tl.constexpr, CACHE: tl.constexpr):
    """The fp32 sum of the SPLIT_K partials at ws_ptr + s * MN + offs, added in split order (fixed, so
    bitwise reproducible, and the same bits in the reduce kernels and the last split of SELF_REDUCE).
    CACHE is the loads' cache modifier, always passed: Triton 3.6 does not make a jit function's string
    default a constexpr, and the load then fails to build."""
    total = tl.full(offs.shape, 0.0, tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0, cache_modifier=CACHE)
    return total


@triton.jit
def splitk_partials(ws_ptr, counter_ptr, pid, pid_k, acc, offs, mask, MN,
                    SPLIT_K: tl.constexpr, SELF_REDUCE: tl.constexpr):
    """Store split pid_k's fp32 partial `acc` of tile `pid` at ws_ptr + pid_k * MN + offs (the
    [SPLIT_K, M, N] workspace). Without SELF_REDUCE the reduce kernel finishes the tile: (False, zeros).
    With SELF_REDUCE the split counts its arrival on counter[pid] (0 between launches) and the last to
    arrive gets (True, the partials summed in the reduce kernels' fixed order), so the tile's output is
    the two-launch one bit for bit; it sets the counter back to 0 for the next launch (graph replays
    reuse the counters). Every split-K GEMM kernel of the library ends here."""
    tl.store(ws_ptr + pid_k * MN + offs, acc, mask=mask)
    is_last = False
    total = tl.full(acc.shape, 0.0, tl.float32)
    if SELF_REDUCE:
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel", scope="gpu")
        is_last = arrived == SPLIT_K - 1
        if is_last:  # .cg: read through L2, never a stale L1 line of this SM
            total = sum_splits(ws_ptr, offs, mask, MN, SPLIT_K, ".cg")
            tl.store(counter_ptr + pid, 0)
    return is_last, total


@triton.jit
def _scale_bias(y, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_as, stride_ws,
                HAS_A_SCALE: tl.constexpr, HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y [BM, BN] fp32 times a_scale[m * stride_as] and w_scale[n * stride_ws] (0: one scale), plus bias[n]."""
    if HAS_A_SCALE:
        y *= tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=1.0).to(tl.float32)[:, None]
    if HAS_W_SCALE:
        y *= tl.load(w_scale_ptr + offs_n * stride_ws, mask=mask_n, other=1.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def scaled_tile_store(y, out_ptr, final_ptr, counter_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, pid, pid_k,
                      offs_m, offs_n, mask_m, mask_n, M, N, out_row_pitch, stride_as, stride_ws,
                      HAS_A_SCALE: tl.constexpr, HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT_K: tl.constexpr, SELF_REDUCE: tl.constexpr):
    """The quantized GEMMs' epilogue for the tile's fp32 sum y [BM, BN]: without split-K, scales and bias
    now and the store to out [M, N] (rows out_row_pitch apart). With split-K, y is a partial in the
    workspace out_ptr; scales and bias are applied once to the whole sum, by the reduce kernel or the last
    split (SELF_REDUCE, into final [M, N] contiguous), in the reduce kernel's order (the same bits)."""
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offs = offs_m[:, None] * out_row_pitch + offs_n[None, :]
    if SPLIT_K == 1:
        y = _scale_bias(y, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, stride_as,
                        stride_ws, HAS_A_SCALE, HAS_W_SCALE, HAS_BIAS)
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        is_last, total = splitk_partials(out_ptr, counter_ptr, pid, pid_k, y, out_offs, out_mask, M * N,
                                         SPLIT_K, SELF_REDUCE)
        if is_last:
            total = _scale_bias(total, a_scale_ptr, w_scale_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n,
                                stride_as, stride_ws, HAS_A_SCALE, HAS_W_SCALE, HAS_BIAS)
            tl.store(final_ptr + offs_m[:, None] * N + offs_n[None, :],
                     total.to(final_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------- host side

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # replaced counter buffers: graphs captured with them may still run
_COUNTERS_MIN = 4096


def split_k_counters(device: torch.device, num_tiles: int) -> torch.Tensor:
    """The persistent zeroed int32 arrival counters of SELF_REDUCE split-K launches on `device`
    (every GEMM launch passes them; only SELF_REDUCE reads them). A buffer too small is replaced,
    and the old one stays referenced, so a graph captured with it still runs."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < num_tiles:
        if device.type == "meta":  # recording: shapes only
            return torch.empty(max(num_tiles, 1), dtype=torch.int32, device=device)
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[device] = torch.zeros(max(num_tiles, _COUNTERS_MIN), dtype=torch.int32, device=device)
    return buf


@dataclass(frozen=True)
class SplitKLaunch:
    """How a GEMM config covers out [M, N] over K: grid (tiles, splits); `constexprs` the tiling's
    (BLOCK_M/N/K, GROUP_SIZE_M, SPLIT_K, SELF_REDUCE); each split covers `k_per_split` (whole BLOCK_K
    steps, the last one stops at K, masked). `target` is what the GEMM kernel stores into: out itself
    (rows `stride_target` apart), or with split-K the fp32 workspace [SPLIT_K, M, N]."""
    grid: tuple[int, int]
    constexprs: dict
    split_k: int
    self_reduce: bool
    k_per_split: int
    target: torch.Tensor
    stride_target: int
    counters: torch.Tensor  # read only with SELF_REDUCE


def split_k_launch(config: dict, out: torch.Tensor, M: int, N: int, K: int) -> SplitKLaunch:
    """The launch geometry of `config` for the [M, N] = [M, K] @ [N, K].T GEMM writing `out`."""
    c = config["constexprs"]
    block_m, block_n, block_k, split_k = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"]
    # SELF_REDUCE: the last split reduces in-kernel, no reduce launch (see gemm.py's docstring)
    self_reduce = bool(c.get("SELF_REDUCE", False)) and split_k > 1
    num_tiles = cdiv(M, block_m) * cdiv(N, block_n)
    if split_k == 1:
        target, stride_target = out, out.stride(0)
    else:
        assert out.is_contiguous()
        target, stride_target = torch.empty((split_k, M, N), dtype=torch.float32, device=out.device), N
    return SplitKLaunch(
        grid=(num_tiles, split_k),
        constexprs=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_SIZE_M=c["GROUP_SIZE_M"],
                        SPLIT_K=split_k, SELF_REDUCE=self_reduce),
        split_k=split_k, self_reduce=self_reduce, k_per_split=cdiv(cdiv(K, split_k), block_k) * block_k,
        target=target, stride_target=stride_target, counters=split_k_counters(out.device, num_tiles))
