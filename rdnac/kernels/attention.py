"""Attention over the paged KV cache: IR op `attention` (see rdnac/ir/ops.py).

Two variants of the same op, picked per phase by kernel selection:

* `attention_prefill`: varlen causal prefill (also chunked prefill, where a
  sequence's queries start after context already in the cache, and mixed
  batches). FlashAttention-style online softmax over key tiles. The GQA group
  is packed into the M tile: row r of a tile is query token r // GROUP, query
  head kv_head * GROUP + r % GROUP. All heads sharing a kv head then read each
  K/V tile once, and short query chunks (a 7-token chunk at GQA 4:1 is 28 rows)
  still fill an MMA tile. Grid (B, cdiv(max_query_len * GROUP, BLOCK_M), Hk),
  the heaviest query tiles first. Each query tile walks its keys in three
  loops over one tile body (`_prefill_tile`): the window's lower edge
  (masked), the interior every row sees (no mask, no bounds: most of a long
  prompt's work, pipelined num_stages deep), the causal diagonal and the
  sequence's end (masked). The scale and log2(e) join the softmax's FMA
  (`prefill_softmax_step`): one FMA and one exp2 per score.
* `attention_decode` (and `attention_quant_decode`): one query per sequence,
  split-K over key tiles; its kernels are in `rdnac.kernels.attention_decode`.

Keys are gathered per key through the block table (slot = block_tables[b, j //
KV_BLOCK_SIZE] * KV_BLOCK_SIZE + j % KV_BLOCK_SIZE), so BLOCK_N (a power of two
>= 16, the tl.dot minimum) is independent of the cache block size; the
configs offer BLOCK_N >= 16 = the default KV block size. head_dim is padded to
BLOCK_D = next power of two with masks (64, 80, 128 tested). Softmax runs in
base 2 (scores scaled by log2(e)); sinks are logits in natural units.
A query that sees no key (seq_len 0, never produced by the runtime) returns 0
where the reference returns NaN.

Config spaces (`config_space(problem)`; problem keys: phase ("prefill" |
"decode"), num_heads, num_kv_heads, head_dim, block_size, max_model_len,
dtype, optional num_seqs (decode batch size, steers the default NUM_SPLITS)):
  prefill: BLOCK_M {16, 32, 64, 128} x BLOCK_N {16, 32, 64} x num_warps {4, 8}
           x num_stages {1, 2, 3}, pruned to K/V/Q tiles within 64 KiB LDS (every target), no 16x8-warp
           tiles and no 128-row tiles on 4 warps (they spill on gfx1201 at D=128); then wider tiles
           for the larger LDS of sm90 and gfx950 (`_WIDE_PREFILL_TILES`: 128x128 and 128x64 on 8 warps,
           2-4 stages, ...), within sm90's 227 KiB. Which fit a target is the cost model's call
           (`prefill_lds_bytes`) and the compiled binary's (spills), each rejection logged.
           Heads of 256 and wider add tiles whose Q . K^T runs in head-dim chunks (BLOCK_DK = HEAD_CHUNK,
           `_HEAD_CHUNK_TILES`): the only ones that build without spills on gfx1151 there.
           Default 64x64 (D <= 64) or 64x32, 4 warps, 2 stages: legal on every target.
  decode:  NUM_SPLITS {1, 2, 4, 8, 16} x BLOCK_N {16, 32, 64}, 4 warps, 2 stages. Default
           BLOCK_N 32 and about one split per 512 keys of max_model_len (at most 16), halved
           while num_seqs * num_kv_heads * NUM_SPLITS > 1024 programs. FP8 caches (problem key
           kv_dtype, the cache's dtype, also a tuning key: bf16-measured configs do not carry over):
           NUM_SPLITS {1, ..., 32} x BLOCK_N {32, 64, 128}, 4 warps, 3 stages; default BLOCK_N 64 and
           one split per 256 keys (at most 32), halved the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.ir.fp8 import kv_format
from rdnac.kernels.fp8_quant import quantize_activations
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

_LOG2E = tl.constexpr(1.4426950408889634)
# tl.max/tl.min/tl.sum/tl.zeros are @triton.jit functions, which the interpreter path cannot call;
# tl.reduce with the standard combine functions is what they lower to (our operands are 32-bit already),
# and the interpreter recognizes these combine functions and reduces with numpy.
_MAX = tl.standard._elementwise_max
_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine
_SMALLEST_LDS_BYTES = 64 * 1024  # gfx1201/gfx1151/gfx942; see DESIGN.md "Targets"
# Model-shape strides (never token counts): binaries specialize on their divisibility by 16 so K/V/Q
# rows load as 16-byte vectors. Without it the H100 ran the prefill kernel 2x slower (497 vs 233 us
# at 2048 tokens, Qwen3-8B widths). The block-table stride (max_model_len / block size) is left out.
_CACHE_STRIDES = ("stride_kb", "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh")
AOT_DIVISIBLE = {"_prefill_kernel": ("stride_qt", "stride_ot", *_CACHE_STRIDES),
                 # the key-tile helper, inlined into _prefill_kernel, gets the kernel's strides
                 "_prefill_tile": ("stride_kb", "stride_ks", "stride_vb", "stride_vs")}


@triton.jit
def scores_log2(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """q [rows, D] @ k [keys, D]^T in log2 units (softmax runs in base 2: one multiply per score),
    softcapped first where the model has it: softcap * tanh(s / softcap), tanh via exp (portable)."""
    if HAS_SOFTCAP:
        s = tl.dot(q, tl.trans(k)) * scale
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * _LOG2E
    else:
        s = tl.dot(q, tl.trans(k)) * (scale * _LOG2E)
    return s


@triton.jit
def kv_operand(x, q, KV_FP8: tl.constexpr):
    """A K or V tile as a dot operand: FP8 cache bits widened to q's dtype (exact: e4m3 fits in bf16 and
    fp16); their scales are applied outside the loop (k_scale within the score scale, v_scale on the
    output)."""
    if KV_FP8:
        x = x.to(q.dtype)
    return x


@triton.jit
def softmax_step(s, m_i, l_i, MASKED: tl.constexpr):
    """One online-softmax step over a tile of scores s [rows, keys] (log2 units, -inf where masked):
    (the new running max, the rescale of what came before, the tile's weights p, the new running sum).
    MASKED: a row may have seen no key yet (its max still -inf), so -inf - -inf is kept out."""
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # every row sees these keys: finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.reduce(p, 1, _SUM)


@triton.jit
def prefill_scores(q, k, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """q [rows, D] @ k [keys, D]^T in the units `prefill_softmax_step` multiplies by its qk_scale: the raw dot
    products (the scale and log2(e) join the softmax's one FMA per score), or, softcapped, log2 units
    already (qk_scale 1): softcap * tanh(s * scale / softcap), tanh via exp (portable)."""
    return prefill_softcap(tl.dot(q, tl.trans(k)), scale, softcap, HAS_SOFTCAP)


@triton.jit
def prefill_softcap(s, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw scores s in `prefill_scores`' units: unchanged, or softcapped and in log2 units."""
    if HAS_SOFTCAP:
        s = s * scale
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * _LOG2E
    return s


@triton.jit
def _chunked_scores(q_rows, k_rows, j0, j, kv_end, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr,
                    MASKED: tl.constexpr):
    """Raw scores Q . K^T [BLOCK_M, BLOCK_N] summed over head-dim chunks of BLOCK_DK, each chunk of Q and K
    loaded where it is used. Why: RDNA3's WMMA operands are replicated across the two half-waves, so a whole
    [rows, 256] Q tile held as a dot operand through the key loop costs ~128 VGPRs a thread (the K tile as
    much again) and gfx1151 spilled every head_dim 256 tile. Q is re-read per key tile from L1/L2.
    q_rows [BLOCK_M, 1] points at each query row's head (rows past the sequence clamped onto it: no mask);
    k_rows [BLOCK_N, 1] at each key's head; MASKED: keys j >= kv_end are not loaded (zero)."""
    s = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    # A run-time loop over chunks, counted from the key tile's first key: Q's addresses then depend on the
    # key loop, which keeps the compiler from hoisting the loop-invariant Q loads out of it (Triton's load
    # LICM did with a constexpr-bounded loop: the whole Q tile was back in registers).
    for c in range(j0, j0 + BLOCK_D, BLOCK_DK):
        dk = (c - j0) + tl.arange(0, BLOCK_DK)
        if BLOCK_D != HEAD_DIM:
            q = tl.load(q_rows + dk[None, :], mask=(dk < HEAD_DIM)[None, :], other=0.0)
        else:
            q = tl.load(q_rows + dk[None, :])
        if MASKED:
            k = tl.load(k_rows + dk[None, :], mask=(j < kv_end)[:, None] & (dk < HEAD_DIM)[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_rows + dk[None, :], mask=(dk < HEAD_DIM)[None, :], other=0.0)
        else:
            k = tl.load(k_rows + dk[None, :])
        s = tl.dot(q, tl.trans(kv_operand(k, q, KV_FP8)), s)
    return s


@triton.jit
def prefill_softmax_step(s, m_i, l_i, qk_scale, MASKED: tl.constexpr):
    """`softmax_step` for scores s [rows, keys] that become log2 units times qk_scale (> 0, so the row max
    of the raw scores times qk_scale is the max of the scaled ones, bit for bit): the running max is kept
    in log2 units and each weight is exp2(s * qk_scale - max), one FMA and one exp2 per score, where
    scaling the scores first costs a multiply per score more. -inf (masked) stays -inf."""
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX) * qk_scale)
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # every row sees these keys: finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.reduce(p, 1, _SUM)


@triton.jit
def _prefill_tile(acc, m_i, l_i, q, pos, start, kv_end, bt_row, k_head, v_head, stride_kb, stride_ks, stride_vb,
                  stride_vs, qk_scale, scale, softcap, sliding_window, d, d_ok, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, KV_FP8: tl.constexpr, MASKED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr):
    """One key tile [start, start + BLOCK_N) of a query tile: (acc, m_i, l_i) after it. Keys are gathered
    through the block table, their rows as stored ([BLOCK_N, BLOCK_D], head dim contiguous: coalesced).
    MASKED: the causal diagonal, the sequence's end or the window's edge cut through the tile; otherwise
    every row sees every key and nothing is masked or bounds-checked.
    0 < BLOCK_DK < BLOCK_D: q is the query rows' pointers [BLOCK_M, 1], not the Q tile, and Q . K^T runs over
    head-dim chunks of BLOCK_DK (`_chunked_scores`)."""
    j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    if MASKED:
        j_ok = j < kv_end
        blk = tl.load(bt_row + j // KV_BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        kv_mask = j_ok[:, None] & d_ok[None, :]
    else:
        blk = tl.load(bt_row + j // KV_BLOCK_SIZE).to(tl.int64)
        kv_mask = d_ok[None, :]  # all true where BLOCK_D == HEAD_DIM: no mask then (below)
    in_blk = (j % KV_BLOCK_SIZE)[:, None]
    # [BLOCK_N, 1] row pointers first, the head dim last: a loop-invariant [BLOCK_N, BLOCK_D] pointer tile
    # hoisted out of the loop would hold registers through it
    k_ptrs = k_head + blk[:, None] * stride_kb + in_blk * stride_ks + d[None, :]  # [BLOCK_N, BLOCK_D]
    v_ptrs = v_head + blk[:, None] * stride_vb + in_blk * stride_vs + d[None, :]
    if BLOCK_DK != 0 and BLOCK_DK != BLOCK_D:
        k_rows = k_head + blk[:, None] * stride_kb + in_blk * stride_ks  # [BLOCK_N, 1]
        s = _chunked_scores(q, k_rows, start, j, kv_end, HEAD_DIM, BLOCK_D, BLOCK_DK, BLOCK_M, BLOCK_N, KV_FP8, MASKED)
        s = prefill_softcap(s, scale, softcap, HAS_SOFTCAP)
        v_type = q.dtype.element_ty
    else:
        if MASKED or BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = prefill_scores(q, kv_operand(k, q, KV_FP8), scale, softcap, HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        v_type = q.dtype
    if MASKED:
        allowed = j_ok[None, :] & (j[None, :] <= pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (j[None, :] > pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
    m_new, alpha, p, l_i = prefill_softmax_step(s, m_i, l_i, qk_scale, MASKED)
    if MASKED or BLOCK_D != HEAD_DIM:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if KV_FP8:
        v = v.to(v_type)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr, positions_ptr,
        sinks_ptr, out_ptr,
        stride_qt, stride_ot, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        scale, softcap, sliding_window, v_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
        HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr = False, PDL: tl.constexpr = False,
        BLOCK_DK: tl.constexpr = 0):
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    seq = tl.program_id(0)
    # Causal tiles further down a sequence see more keys: blocks are scheduled in launch order, so the
    # heaviest tiles go first and the light ones fill the tail of the grid.
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len * GROUP:  # max_query_len covers the longest sequence only
        return

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // GROUP  # [BLOCK_M] query token within the sequence
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M] query head
    row_ok = tok < q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    if BLOCK_DK == 0 or BLOCK_DK == BLOCK_D:  # the Q tile in registers through the key loops
        q_off = (q_start + tok)[:, None] * stride_qt + head[:, None] * HEAD_DIM + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    else:  # Q's row pointers; rows past the sequence read its last token's query (finite, never stored)
        q = q_ptr + ((q_start + tl.minimum(tok, q_len - 1)) * stride_qt + head * HEAD_DIM)[:, None]
    pos = tl.load(positions_ptr + q_start + tok, mask=row_ok, other=0).to(tl.int32)  # [BLOCK_M]

    # Key ranges, positions need not be sorted: [kv_lo, kv_end) is what some row of the tile sees;
    # within it [win_full, kv_full) is what every row sees (j <= the smallest position, and with a window
    # j > the largest position - window), whole tiles of which need no mask at all.
    seq_len = tl.load(seq_lens_ptr + seq)
    max_pos = tl.reduce(tl.where(row_ok, pos, -1), 0, _MAX)
    min_pos = tl.reduce(tl.where(row_ok, pos, max_pos), 0, _MIN)
    kv_end = tl.minimum(seq_len, max_pos + 1)
    kv_full = tl.maximum((tl.minimum(seq_len, min_pos + 1) // BLOCK_N) * BLOCK_N, 0)
    if HAS_WINDOW:
        kv_lo = (tl.maximum(min_pos - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
        win_full = (tl.maximum(max_pos - sliding_window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        win_full = tl.maximum(kv_lo, tl.minimum(win_full, kv_full))
        kv_full = tl.maximum(kv_full, win_full)  # kv_lo <= win_full <= kv_full: no key twice, none skipped
    else:
        win_full = 0
    if HAS_SOFTCAP:
        qk_scale = 1.0  # prefill_scores returns log2 units
    else:
        qk_scale = scale * _LOG2E

    bt_row = block_tables_ptr + seq * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    # Loop bounds are run-time values (a constexpr-bounded loop is unrolled by Triton 3.6).
    if HAS_WINDOW:  # tiles at the window's lower edge, masked (some rows no longer see them)
        for start in range(kv_lo, win_full, BLOCK_N):
            acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, pos, start, kv_end, bt_row, k_head, v_head, stride_kb,
                                          stride_ks, stride_vb, stride_vs, qk_scale, scale, softcap, sliding_window,
                                          d, d_ok, HEAD_DIM, BLOCK_D, BLOCK_N, KV_BLOCK_SIZE, HAS_SOFTCAP, HAS_WINDOW,
                                          KV_FP8, True, BLOCK_M, BLOCK_DK)
    # Interior tiles, every key visible to every row: no masks, no bounds, one FMA and one exp2 per score.
    # Most of a long prefill's work; the loop num_stages pipelines.
    for start in range(win_full, kv_full, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, pos, start, kv_end, bt_row, k_head, v_head, stride_kb,
                                      stride_ks, stride_vb, stride_vs, qk_scale, scale, softcap, sliding_window,
                                      d, d_ok, HEAD_DIM, BLOCK_D, BLOCK_N, KV_BLOCK_SIZE, HAS_SOFTCAP, HAS_WINDOW,
                                      KV_FP8, False, BLOCK_M, BLOCK_DK)
    # The causal diagonal and the sequence's end, masked.
    for start in range(kv_full, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q, pos, start, kv_end, bt_row, k_head, v_head, stride_kb,
                                      stride_ks, stride_vb, stride_vs, qk_scale, scale, softcap, sliding_window,
                                      d, d_ok, HEAD_DIM, BLOCK_D, BLOCK_N, KV_BLOCK_SIZE, HAS_SOFTCAP, HAS_WINDOW,
                                      KV_FP8, True, BLOCK_M, BLOCK_DK)

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (triggering at the top
        gdc_launch_dependents()  # let chains of waiting kernels crowd the SMs: 8B decode 17% slower)
    if KV_FP8:  # V's per-tensor scale, once per output row instead of once per key
        acc = acc * v_scale
    if HAS_SINKS:  # the sink is one extra logit in the denominator, with no value
        sink = tl.load(sinks_ptr + head).to(tl.float32) * _LOG2E
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        l_i = l_i * alpha + tl.exp2(sink - m_f)
        acc = acc * alpha[:, None]
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (q_start + tok)[:, None] * stride_ot + head[:, None] * HEAD_DIM + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _common_args(q, k_cache, v_cache, block_tables, num_heads, num_kv_heads, head_dim):
    num_blocks, block_size, hk, hd = k_cache.shape
    assert (hk, hd) == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape, (k_cache.shape, v_cache.shape)
    assert q.dim() == 2 and q.shape[1] == num_heads * head_dim and q.stride(1) == 1, (q.shape, q.stride())
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and block_tables.stride(1) == 1
    assert k_cache.dtype == v_cache.dtype and (q.dtype == k_cache.dtype or kv_format(k_cache.dtype)), \
        (q.dtype, k_cache.dtype, v_cache.dtype)
    out = torch.empty(q.shape[0], num_heads * head_dim, dtype=q.dtype, device=q.device)  # [T, Hq*D]
    strides = (q.stride(0), out.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0))
    shape_constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": next_power_of_2(head_dim),
                        "GROUP": num_heads // num_kv_heads, "KV_BLOCK_SIZE": block_size}
    if kv_format(k_cache.dtype):  # float caches keep the specializations they had
        shape_constexprs["KV_FP8"] = True
    return out, strides, shape_constexprs


def attention_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, positions: torch.Tensor,
                      sinks: torch.Tensor | None = None, *, num_heads: int, num_kv_heads: int, head_dim: int,
                      scale: float, sliding_window: int = 0, softcap: float = 0.0, k_scale: float = 1.0,
                      v_scale: float = 1.0, max_query_len: int, config: dict, launcher: Launcher) -> torch.Tensor:
    """Varlen (chunked) prefill. `max_query_len` (host int) bounds cu_seqlens_q's largest difference.
    FP8 caches: k_scale joins the score scale, v_scale multiplies the output."""
    out, strides, cx = _common_args(q, k_cache, v_cache, block_tables, num_heads, num_kv_heads, head_dim)
    c = config["constexprs"]
    grid = (seq_lens.shape[0], cdiv(max_query_len * cx["GROUP"], c["BLOCK_M"]), num_kv_heads)
    args = (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, positions,
            q if sinks is None else sinks, out, *strides, float(scale) * float(k_scale), float(softcap),
            int(sliding_window), float(v_scale))
    launcher.launch(_prefill_kernel, grid, args,
                    constexprs={**cx, "HAS_SINKS": sinks is not None, "HAS_SOFTCAP": softcap > 0,
                                "HAS_WINDOW": sliding_window > 0, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"],
                                # head-dim chunks of Q . K^T; whole-head configs launch as they did
                                **({"BLOCK_DK": c["BLOCK_DK"]} if c.get("BLOCK_DK", cx["BLOCK_D"]) < cx["BLOCK_D"]
                                   else {})},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def attention_quant_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, positions: torch.Tensor,
                            sinks: torch.Tensor | None = None, *, fp8_format: str, group: int, max_query_len: int,
                            config: dict, launcher: Launcher, **attrs) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill attention, then the quantization o_proj would do (two launches: its cost is the bf16 round
    trip, small next to prefill's GEMMs)."""
    out = attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, positions, sinks, **attrs,
                            max_query_len=max_query_len, config=config, launcher=launcher)
    return quantize_activations(out, None, fp8_format, group, launcher=launcher)


def _config(num_warps: int, num_stages: int, **constexprs: int) -> dict:
    return {"constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages}


def _prefill_lds_bytes(block_m: int, block_n: int, block_d: int, num_stages: int, elem_bytes: int) -> int:
    """Rough shared-memory need: Q tile once, K and V tiles per pipeline stage (the 64 KiB pruning of the
    targets' common space, kept as it was)."""
    return elem_bytes * block_d * (block_m + 2 * block_n * max(num_stages, 1))


def prefill_lds_bytes(config: dict, head_dim: int, elem_bytes: int = 2) -> int:
    """Shared memory of one prefill program as Triton 3.9's cross-compiles report it at head_dim 128: the
    Q tile and two K + V buffers from 2 stages up (sm90: 128x128 at 2-4 stages 160-161 KiB, 128x64 96 KiB;
    gfx950: 128x128 164 KiB; one buffer at 1 stage). The cost model's "does not fit" test per target."""
    c = config["constexprs"]
    block_d = next_power_of_2(head_dim)
    if c.get("BLOCK_DK", block_d) < block_d:  # head-dim chunks: the V tile and one Q and K chunk (cross-compiles
        # at head_dim 256, chunks of 32: gfx1151/gfx950 2 x BLOCK_N x 256 bytes at 1-2 stages, sm90 up to this)
        return elem_bytes * (c["BLOCK_N"] * block_d + (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_DK"])
    buffers = max(1, min(config["num_stages"], 2))
    return elem_bytes * block_d * (c["BLOCK_M"] + 2 * c["BLOCK_N"] * buffers)


# Tiles past the 64 KiB every target has, for targets with more (sm90 227 KiB, gfx950 160 KiB): 128-row
# tiles on 8 warps (two warpgroups of 64 rows: sm90's wgmma shape) and 128-key tiles, which halve the
# accumulator rescales per score and the loop's fixed work per key. The cost model rejects them where they do
# not fit (`prefill_lds_bytes`); spills are rejected from the compiled binary (CDNA spills 64-key tiles at
# head_dim 128: its legal tiles are the 32-key ones of the common space).
_WIDE_PREFILL_TILES = ((128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 2), (128, 64, 8, 3),
                       (128, 64, 8, 4), (64, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2))
_LARGEST_LDS_BYTES = 227 * 1024  # sm90; see DESIGN.md "Targets"
# Heads of 256 and wider: Q . K^T in head-dim chunks of HEAD_CHUNK (`_chunked_scores`), so neither the Q
# tile nor the K tile is held whole as a dot operand. gfx1151 spilled every whole-head tile (16x16 on 4 warps
# at 1 stage: 256 VGPRs + 136 spilled); chunked, 16x16 needs 125 and 64x32 on 8 warps 222 (Triton 3.9
# cross-compiles). Tiles within 64 rows x 64 keys: the [BLOCK_M, 256] fp32 accumulator stays whole.
HEAD_CHUNK = 32
_HEAD_CHUNK_TILES = ((16, 16, 4, 1), (16, 16, 4, 2), (32, 16, 4, 1), (32, 32, 8, 1), (32, 32, 8, 2), (64, 32, 8, 1),
                     (64, 32, 8, 2), (64, 64, 8, 1), (64, 64, 8, 2))


def _reads_fp8(problem: dict) -> bool:
    return bool(kv_format(getattr(torch, problem.get("kv_dtype", problem["dtype"]))))


def config_space(problem: dict) -> list[dict]:
    """Candidates for one attention problem (keys: see the module docstring)."""
    if problem["phase"] == "decode":
        if _reads_fp8(problem):
            return [_config(4, 3, NUM_SPLITS=s, BLOCK_N=n) for s in (1, 2, 4, 8, 16, 32) for n in (32, 64, 128)]
        return [_config(4, 2, NUM_SPLITS=s, BLOCK_N=n) for s in (1, 2, 4, 8, 16) for n in (16, 32, 64)]
    block_d = next_power_of_2(problem["head_dim"])
    # Sized for 2-byte tiles: float32 only runs on the CPU interpreter, where LDS does not exist.
    common = [_config(w, st, BLOCK_M=m, BLOCK_N=n)
              for m in (16, 32, 64, 128) for n in (16, 32, 64) for w in (4, 8) for st in (1, 2, 3)
              if _prefill_lds_bytes(m, n, block_d, st, 2) <= _SMALLEST_LDS_BYTES
              and not (m == 16 and w == 8) and not (m == 128 and w == 4)]  # 128x4 spills at D=128 on wave32
    wide = [_config(w, st, BLOCK_M=m, BLOCK_N=n) for m, n, w, st in _WIDE_PREFILL_TILES]
    # 256-wide heads: a 128-row fp32 accumulator alone is 128 registers a thread on 8 warps
    wide = [c for c in wide if c not in common and prefill_lds_bytes(c, block_d) <= _LARGEST_LDS_BYTES
            and (block_d <= 128 or c["constexprs"]["BLOCK_M"] * c["constexprs"]["BLOCK_N"] <= 64 * 64)]
    chunked = [_config(w, st, BLOCK_M=m, BLOCK_N=n, BLOCK_DK=HEAD_CHUNK) for m, n, w, st in _HEAD_CHUNK_TILES
               if block_d >= 256]
    return common + wide + chunked


def default_config(problem: dict) -> dict:
    if problem["phase"] == "decode":
        # Aim at >= 512 keys per split at full context (FP8 caches: 256, see below), fewer splits when the
        # batch alone fills the GPU.
        fp8 = _reads_fp8(problem)
        keys, most = (256, 32) if fp8 else (512, 16)
        splits = min(most, max(1, next_power_of_2(problem.get("max_model_len", 4096) // keys)))
        busy = problem.get("num_seqs", 1) * problem["num_kv_heads"]
        while splits > 1 and busy * splits > 1024:
            splits //= 2
        if fp8:
            # A small batch's decode programs are bound by their loop's instructions per key tile, not by
            # bytes: on an H100 the bf16-tuned 8 splits x 64 keys ran an 8192-token FP8 cache at 0.44 TB/s
            # (session 16). Twice the splits of bf16 put twice the programs in flight, and a 64-key FP8 tile
            # is the bytes of bf16's 32-key one, 3 stages deep (52 KiB of LDS: within 64 KiB).
            return _config(4, 3, NUM_SPLITS=splits, BLOCK_N=64)
        return _config(4, 2, NUM_SPLITS=splits, BLOCK_N=32)
    if next_power_of_2(problem["head_dim"]) <= 64:
        return _config(4, 2, BLOCK_M=64, BLOCK_N=64)
    return _config(4, 2, BLOCK_M=64, BLOCK_N=32)


# The attention family's registry record (FAMILY) is in attention_decode.py, which imports this module.
