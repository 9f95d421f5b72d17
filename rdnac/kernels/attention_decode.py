"""Decode attention over the paged KV cache: the decode variant of IR op `attention`
and of `attention_quant` (kernel selection picks it per phase; prefill, the shared
argument checks and both phases' configs are in `rdnac.kernels.attention`).

`attention_decode`: one query per sequence (T == B, row b belongs to
sequence b). Program (b, kv_head, split) holds the GROUP query heads of one
kv head (padded to BLOCK_G >= 16 rows for tl.dot) and a contiguous range of
key tiles computed in-kernel from seq_lens, so the grid (B, Hk, NUM_SPLITS)
depends only on B and the config and a captured graph replays for any
seq_lens. With NUM_SPLITS > 1 each split writes its partial max/sum/acc to
a workspace and `_decode_reduce_kernel` (grid (B, Hq)) merges them, one
split after another; an empty split writes max=-inf, sum=0 and contributes
nothing. With SELF_REDUCE (a measured choice: `rdnac tune` offers it, the
config space and default never do) there is no second launch: each split
counts its arrival on its (b, kv_head) counter (`gemm.split_k_counters`,
atomic, acquire-release at device scope) and the last to arrive merges the
GROUP heads with the reduce kernel's operations in its order, so the output
is bit for bit the two-launch one, then sets the counter back to 0.
NUM_SPLITS == 1 normalizes in place and launches one kernel (SELF_REDUCE is
ignored). With PDL and EARLY_META (plan-wide, `runtime["early_meta"]`) the
step inputs no kernel writes (positions, seq_lens, the block table entries of
the split's first key tile) are read before `griddepcontrol.wait`, and the loop
reads the next tile's entries one step ahead: after the wait, q, K and V load
at once instead of behind two dependent loads. Same arithmetic, same bits.

`attention_quant_decode`: the same kernels with QUANT: whichever program finishes a
head (the only split, the last split with SELF_REDUCE, or the reduce kernel)
rounds it to the output dtype and writes it as o_proj's FP8 activations, one
scale per head, with `fp8_quant`'s rule op for op: the bits of
`attention_decode` followed by `fp8_quant.quantize_activations`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import FORMATS, FP8_MAX
from rdnac.kernels.attention import _CACHE_STRIDES, _LOG2E, _MAX, _common_args, scores_log2, softmax_step
from rdnac.kernels.fp8_quant import GRID, fp8_scale, round_to_fp8_grid
from rdnac.kernels.gemm import split_k_counters
from rdnac.kernels.launch import Launcher, next_power_of_2

AOT_DIVISIBLE = {"_decode_kernel": ("stride_qt", "stride_ot", *_CACHE_STRIDES),  # see attention.py
                 "_decode_reduce_kernel": ("stride_ot",)}


@triton.jit
def fp8_kv_tile(x, j_ok, IS_V: tl.constexpr):
    """An FP8 K or V tile [BLOCK_N, BLOCK_D] as an fp16 dot operand (the scales stay outside the loop: k_scale
    in the score scale, v_scale on the accumulator). fp16, not q's bf16: e4m3fn and e4m3fnuz widen to fp16
    exactly, in one instruction per two values on sm89+ (cvt.rn.f16x2.e4m3x2) and through one f32 convert on
    AMD, where bf16 costs a second conversion per value. V's widening is pinned before the tile's
    shared-memory round trip by a select on the key mask (the loads already zero those rows): left alone,
    Triton moves it after, and an 8-bit tile read in the transposed layout of a dot's B operand is one
    byte load per value (sm90 PTX per 64-key tile, 4 warps: 1045 loop instructions, 632 with both; bf16 KV
    505). K reads its tile untransposed: nothing to pin."""
    x = x.to(tl.float16)
    if IS_V:
        x = tl.where(j_ok[:, None], x, 0.0)
    return x


@triton.jit
def _decode_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, positions_ptr, sinks_ptr, out_ptr,
        part_max_ptr, part_sum_ptr, part_acc_ptr, counter_ptr, q8_ptr, q8_scale_ptr,
        stride_qt, stride_ot, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        scale, softcap, sliding_window, v_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        KV_BLOCK_SIZE: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr = False,
        SELF_REDUCE: tl.constexpr = False, QUANT: tl.constexpr = False, FP8_MAX: tl.constexpr = 448.0,
        MIN_NORMAL: tl.constexpr = 0.0, SUBNORMAL_ROUNDER: tl.constexpr = 0.0, PDL: tl.constexpr = False,
        EARLY_META: tl.constexpr = False):
    if PDL and not EARLY_META:  # programmatic dependent launch: wait for the previous kernel (the trigger
        gdc_wait()  # is after the loop)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kv_head * GROUP + g  # [BLOCK_G] query heads of this kv head
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # EARLY_META: positions, seq_lens and block_tables are step inputs the host wrote before the step, which
    # no kernel writes, so they (and the first key tile's cache blocks) are read before the wait; after it
    # come only the loads of what the previous kernels wrote: q and the keys and values.
    pos = tl.load(positions_ptr + seq).to(tl.int32)

    seq_len = tl.load(seq_lens_ptr + seq)
    kv_end = tl.minimum(seq_len, pos + 1)
    if HAS_WINDOW:
        kv_lo = (tl.maximum(pos - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        kv_lo = 0
    # This split's contiguous share of the key tiles; trailing splits may get none.
    num_tiles = (tl.maximum(kv_end - kv_lo, 0) + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (num_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    lo = kv_lo + split * tiles_per_split * BLOCK_N
    hi = tl.minimum(kv_end, lo + tiles_per_split * BLOCK_N)
    table_row = block_tables_ptr + seq * stride_bt
    if EARLY_META:  # the first tile's cache blocks; each step of the loop reads the next tile's
        j_next = lo + tl.arange(0, BLOCK_N)
        blk_next = tl.load(table_row + j_next // KV_BLOCK_SIZE, mask=j_next < hi, other=0)
        if PDL:
            gdc_wait()
    q = tl.load(q_ptr + seq * stride_qt + head[:, None] * HEAD_DIM + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if KV_FP8:  # fp16 dots over an FP8 cache (fp8_kv_tile); q rounds to fp16 once, not per key tile
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        j_ok = j < hi
        if EARLY_META:
            blk = blk_next.to(tl.int64)
            j_next = j + BLOCK_N
            blk_next = tl.load(table_row + j_next // KV_BLOCK_SIZE, mask=j_next < hi, other=0)
        else:
            blk = tl.load(table_row + j // KV_BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        in_blk = j % KV_BLOCK_SIZE
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + in_blk[:, None] * stride_ks + kv_head * stride_kh
                    + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D], coalesced
        if KV_FP8:
            k = fp8_kv_tile(k, j_ok, False)
        s = scores_log2(q, k, scale, softcap, HAS_SOFTCAP)  # [BLOCK_G, BLOCK_N]
        allowed = j_ok
        if HAS_WINDOW:
            allowed = allowed & (j > pos - sliding_window)
        m_new, alpha, p, l_i = softmax_step(tl.where(allowed[None, :], s, float("-inf")), m_i, l_i, True)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + in_blk[:, None] * stride_vs + kv_head * stride_vh
                    + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if KV_FP8:
            v = fp8_kv_tile(v, j_ok, True)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if KV_FP8:  # V's per-tensor scale, once per output row (and per split: partials merge linearly)
        acc = acc * v_scale

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (triggering at the top
        gdc_launch_dependents()  # let chains of waiting kernels crowd the SMs: 8B decode 17% slower)
    hd_ok = g_ok[:, None] & d_ok[None, :]
    # The whole-context output of this program's heads, where this program finishes them: always without
    # splits; with SELF_REDUCE in the split that arrives last; otherwise _decode_reduce_kernel does.
    if NUM_SPLITS == 1:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head, mask=g_ok, other=0.0).to(tl.float32) * _LOG2E
            m_f = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_f)
            l_i = l_i * alpha + tl.exp2(sink - m_f)
            acc = acc * alpha[:, None]
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        is_last = True
    else:
        part = (seq * num_heads + head) * NUM_SPLITS  # [BLOCK_G] first row of each head's [NUM_SPLITS] partials
        tl.store(part_max_ptr + part + split, m_i, mask=g_ok)
        tl.store(part_sum_ptr + part + split, l_i, mask=g_ok)
        tl.store(part_acc_ptr + (part + split)[:, None] * HEAD_DIM + d[None, :], acc, mask=hd_ok)
        out = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
        is_last = False
        if SELF_REDUCE:  # counter[seq, kv_head] counts finished splits (0 between launches)
            tl.debug_barrier()  # every thread's partial is stored before the release below
            counter = counter_ptr + seq * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            is_last = arrived == NUM_SPLITS - 1
            if is_last:
                # The last split merges _decode_reduce_kernel's way, op for op: the same bits. Loads
                # are .cg: read through L2, never a stale L1 line of this SM.
                m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
                for s in tl.static_range(NUM_SPLITS):
                    m_all = tl.maximum(m_all, tl.load(part_max_ptr + part + s, mask=g_ok, other=float("-inf"),
                                                      cache_modifier=".cg"))
                if HAS_SINKS:
                    sink = tl.load(sinks_ptr + head, mask=g_ok, other=0.0).to(tl.float32) * _LOG2E
                    m_all = tl.maximum(m_all, sink)
                m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
                total = tl.full([BLOCK_G], 0.0, tl.float32)
                for s in tl.static_range(NUM_SPLITS):
                    w = tl.exp2(tl.load(part_max_ptr + part + s, mask=g_ok, other=float("-inf"),
                                        cache_modifier=".cg") - m_safe)  # [BLOCK_G]
                    total += tl.load(part_sum_ptr + part + s, mask=g_ok, other=0.0, cache_modifier=".cg") * w
                    out += tl.load(part_acc_ptr + (part + s)[:, None] * HEAD_DIM + d[None, :], mask=hd_ok, other=0.0,
                                   cache_modifier=".cg") * w[:, None]
                if HAS_SINKS:
                    total += tl.exp2(sink - m_safe)
                out = out / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(counter, 0)  # ready for the next launch (graph replays reuse the counters)
    if is_last:
        y = out.to(out_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D], rounded as the output is stored
        if QUANT:  # o_proj's FP8 activations, one group per head (BLOCK_D == HEAD_DIM == the group):
            # _quant_fp8_kernel's rule on the stored values, op for op, so the bits are the unfused pair's
            yf = y.to(tl.float32)
            amax = tl.reduce(tl.abs(yf), 1, _MAX)  # [BLOCK_G]
            head_scale = fp8_scale(amax, FP8_MAX)
            v = tl.div_rn(yf, head_scale[:, None])
            q8 = round_to_fp8_grid(v, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)  # see fp8_quant
            tl.store(q8_ptr + seq * num_heads * HEAD_DIM + head[:, None] * HEAD_DIM + d[None, :],
                     q8.to(q8_ptr.dtype.element_ty), mask=hd_ok)
            tl.store(q8_scale_ptr + seq * num_heads + head, head_scale, mask=g_ok)
        else:
            tl.store(out_ptr + seq * stride_ot + head[:, None] * HEAD_DIM + d[None, :], y, mask=hd_ok)


@triton.jit
def _decode_reduce_kernel(
        part_max_ptr, part_sum_ptr, part_acc_ptr, sinks_ptr, out_ptr, q8_ptr, q8_scale_ptr, stride_ot,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
        NUM_SPLITS: tl.constexpr, QUANT: tl.constexpr = False, FP8_MAX: tl.constexpr = 448.0,
        MIN_NORMAL: tl.constexpr = 0.0, SUBNORMAL_ROUNDER: tl.constexpr = 0.0, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS  # first row of this head's [NUM_SPLITS] partials
    # Splits are merged one after another, elementwise: a tl.reduce would sum in an order set by the
    # tile's layout, and the SELF_REDUCE merge in _decode_kernel (other tile, other warps) must give these
    # bits. Keep the two in step.
    m_all = tl.full([], float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(part_max_ptr + part + s))
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * _LOG2E
        m_all = tl.maximum(m_all, sink)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.full([], 0.0, tl.float32)
    out = tl.full([BLOCK_D], 0.0, tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        w = tl.exp2(tl.load(part_max_ptr + part + s) - m_safe)  # empty splits (max -inf) weigh 0
        total += tl.load(part_sum_ptr + part + s) * w
        out += tl.load(part_acc_ptr + (part + s) * HEAD_DIM + d, mask=d_ok, other=0.0) * w
    if HAS_SINKS:
        total += tl.exp2(sink - m_safe)
    out = out / tl.where(total > 0, total, 1.0)  # [BLOCK_D]
    y = out.to(out_ptr.dtype.element_ty)
    if QUANT:  # as in _decode_kernel: one FP8 group per head, _quant_fp8_kernel's rule op for op
        yf = y.to(tl.float32)
        amax = tl.reduce(tl.abs(yf), 0, _MAX)
        head_scale = fp8_scale(amax, FP8_MAX)
        v = tl.div_rn(yf, head_scale)
        q8 = round_to_fp8_grid(v, FP8_MAX, MIN_NORMAL, SUBNORMAL_ROUNDER)  # see fp8_quant
        tl.store(q8_ptr + (seq * tl.num_programs(1) + head) * HEAD_DIM + d, q8.to(q8_ptr.dtype.element_ty), mask=d_ok)
        tl.store(q8_scale_ptr + seq * tl.num_programs(1) + head, head_scale)
    else:
        tl.store(out_ptr + seq * stride_ot + head * HEAD_DIM + d, y, mask=d_ok)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, positions: torch.Tensor,
                     sinks: torch.Tensor | None = None, *, num_heads: int, num_kv_heads: int, head_dim: int,
                     scale: float, sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
                     v_scale: float = 1.0, config: dict, launcher: Launcher) -> torch.Tensor:
    """Split-K decode: one query per sequence, so q row b is sequence b (cu_seqlens_q == arange(B + 1),
    which is not read). Padded rows (seq_len 1, table row of block 0) give finite output as long as
    cache block 0 holds finite values (a zero-initialized cache does)."""
    return _decode(q, k_cache, v_cache, block_tables, seq_lens, positions, sinks, num_heads, num_kv_heads,
                   head_dim, scale, sliding_window, softcap, config, launcher, kv_scales=(k_scale, v_scale))


def attention_quant_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, positions: torch.Tensor,
                           sinks: torch.Tensor | None = None, *, num_heads: int, num_kv_heads: int, head_dim: int,
                           scale: float, sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
                           v_scale: float = 1.0, fp8_format: str, group: int, config: dict,
                           launcher: Launcher) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_decode` whose epilogue writes o_proj's FP8 activations: (q8 [T, Hq*D] fp8, scales [T, Hq]),
    one group per head (group == head_dim, a power of two), the bits of attention_decode followed by
    `fp8_quant.quantize_activations`."""
    assert group == head_dim == next_power_of_2(head_dim), \
        f"attention_quant: the kernel quantizes whole heads; group {group} must equal head_dim {head_dim} (a power of 2)"
    q8 = torch.empty(q.shape[0], num_heads * head_dim, dtype=FORMATS[fp8_format], device=q.device)  # [T, Hq*D]
    q8_scale = torch.empty(q.shape[0], num_heads, dtype=torch.float32, device=q.device)  # [T, Hq]
    _decode(q, k_cache, v_cache, block_tables, seq_lens, positions, sinks, num_heads, num_kv_heads, head_dim,
            scale, sliding_window, softcap, config, launcher, quant=(q8, q8_scale, fp8_format),
            kv_scales=(k_scale, v_scale))
    return q8, q8_scale


def _decode(q, k_cache, v_cache, block_tables, seq_lens, positions, sinks, num_heads, num_kv_heads, head_dim,
            scale, sliding_window, softcap, config, launcher, quant=None, kv_scales=(1.0, 1.0)) -> torch.Tensor:
    """Launch decode attention (and its split reduce); with `quant` = (q8, q8_scale, fp8_format) the kernel
    that finishes each head writes it quantized there instead of to the bf16 output. FP8 caches:
    k_scale joins the score scale, v_scale multiplies each split's accumulator."""
    out, strides, cx = _common_args(q, k_cache, v_cache, block_tables, num_heads, num_kv_heads, head_dim)
    num_seqs = seq_lens.shape[0]
    assert q.shape[0] == num_seqs, f"decode needs one query per sequence; got T={q.shape[0]}, B={num_seqs}"
    c = config["constexprs"]
    num_splits, block_n = c["NUM_SPLITS"], c["BLOCK_N"]
    self_reduce = bool(c.get("SELF_REDUCE", False)) and num_splits > 1  # no reduce launch (module docstring)
    has_sinks = sinks is not None
    sinks_arg = q if sinks is None else sinks
    if num_splits > 1:  # float32 partials, fixed size for a given B and config (graph capture safe)
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_max = part_sum = part_acc = out  # never touched
    counters = split_k_counters(q.device, num_seqs * num_kv_heads)  # read only with SELF_REDUCE
    q8, q8_scale, fp8_format = quant if quant is not None else (out, out, None)  # never written without QUANT
    qx = {}
    if quant is not None:
        min_normal, rounder = GRID[fp8_format]
        qx = dict(QUANT=True, FP8_MAX=FP8_MAX[fp8_format], MIN_NORMAL=min_normal, SUBNORMAL_ROUNDER=rounder)
    args = (q, k_cache, v_cache, block_tables, seq_lens, positions, sinks_arg, out, part_max, part_sum, part_acc,
            counters, q8, q8_scale, *strides, float(scale) * float(kv_scales[0]), float(softcap), int(sliding_window),
            float(kv_scales[1]))
    launcher.launch(_decode_kernel, (num_seqs, num_kv_heads, num_splits), args,
                    constexprs={**cx, "BLOCK_G": max(16, next_power_of_2(cx["GROUP"])),
                                "HAS_SINKS": has_sinks, "HAS_SOFTCAP": softcap > 0, "HAS_WINDOW": sliding_window > 0,
                                "NUM_SPLITS": num_splits, "BLOCK_N": block_n, "SELF_REDUCE": self_reduce, **qx},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    if num_splits > 1 and not self_reduce:
        launcher.launch(_decode_reduce_kernel, (num_seqs, num_heads),
                        (part_max, part_sum, part_acc, sinks_arg, out, q8, q8_scale, out.stride(0)),
                        constexprs={"HEAD_DIM": head_dim, "BLOCK_D": cx["BLOCK_D"], "HAS_SINKS": has_sinks,
                                    "NUM_SPLITS": num_splits, **qx},
                        num_warps=2, num_stages=1)
    return out


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels import attention  # noqa: E402
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:  # the quant epilogue changes no config
    # kv_dtype: the dtype decode reads K and V in (an FP8 decode has its own configs and measurements). Prefill
    # problems carry q's dtype there: their MMAs run on it whatever the cache holds (an FP8 tile widens to q's
    # dtype), so prefill measurements carry over between cache dtypes.
    kv_dtype = dtype_name(ins[1]) if phase == "decode" else dtype_name(ins[0])
    return {"phase": phase, "num_heads": a["num_heads"], "num_kv_heads": a["num_kv_heads"],
            "head_dim": a["head_dim"], "block_size": runtime["kv_block_size"],
            "max_model_len": runtime["max_model_len"], "dtype": dtype_name(ins[0]), "kv_dtype": kv_dtype,
            "num_seqs": ins[4].shape[0], "num_tokens": ins[0].shape[0]}


# head_dim 256 (Qwen3.5 / Qwen3-Next full-attention layers, Gemma): the default decode tile keeps q, a
# [16, 256] float32 accumulator and (AMD's stream pipeliner) one stage of K and V in registers. Cross-compiled
# with Triton 3.9 (16/2 heads, 1000-token context): bf16 32-key tiles on 2 stages spill on gfx1151 (226 VGPRs
# spilled; 16 keys still 131, 16 keys on 8 warps 105) and on gfx1201 (2); FP8 64-key tiles on 3 stages on
# gfx1201 (468) and gfx950 (261). One stage drops the registered K/V stage: 16 keys on 1 stage need 240
# VGPRs on gfx1151 at 4 warps, 216 at 8, 156 on gfx1201, 108-128 on gfx942/gfx950, 119 registers on sm90.
# These follow the default in the space, at its split count first, so where the default spills, kernel
# selection logs it rejected and the next candidate fits (8 warps first: the engine measured decode
# attention on gfx1151 at 31% of bandwidth with 2 warps, fixed by 8). Targets where the default fits keep it.
WIDE_HEAD_DIM = 256
WIDE_HEAD_TILES = ((16, 8, 1), (16, 4, 1), (32, 8, 1), (32, 4, 1))  # (BLOCK_N, num_warps, num_stages)


def config_space(problem: dict) -> list[dict]:
    """attention.config_space; at decode with head_dim >= WIDE_HEAD_DIM the register-lean tiles come first."""
    space = attention.config_space(problem)
    if problem["phase"] != "decode" or next_power_of_2(problem["head_dim"]) < WIDE_HEAD_DIM:
        return space
    splits = attention.default_config(problem)["constexprs"]["NUM_SPLITS"]
    all_splits = sorted({c["constexprs"]["NUM_SPLITS"] for c in space}, key=lambda s: s != splits)
    lean = [attention._config(w, st, NUM_SPLITS=s, BLOCK_N=n) for s in all_splits for n, w, st in WIDE_HEAD_TILES]
    return lean + [c for c in space if c not in lean]


# The attention family's record: its prefill kernels and config space are in attention.py, which this
# module imports (a record there could not name the decode wrappers without a cycle).
FAMILY = KernelFamily(
    "attention", config_space=config_space, default_config=attention.default_config,
    cost_model="attention",  # prefill tiles ranked per target; decode keeps its default first
    tuning_key=("phase", "num_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "kv_dtype"),
    # a config depends on the sequences of a decode step, the tokens of a prefill step
    size=lambda p: p["num_seqs"] if p["phase"] == "decode" else p["num_tokens"],
    ops={"attention": OpKernel(attention.attention_prefill, _problem, decode=attention_decode,
                               takes_max_query_len=True),
         "attention_quant": OpKernel(attention.attention_quant_prefill, _problem, decode=attention_quant_decode,
                                     takes_max_query_len=True)})
