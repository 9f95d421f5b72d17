"""The paged prefill attention kernel as it stood before issue 29 (rdnac/kernels/attention.py at dc0dd7cfad9868af2edf4067bdec62bb64d7482b):
the A side of bench/prefill_attention29.py's old-against-new rows, launched through the same wrapper (the
two kernels take the same arguments). A benchmark fixture, not a library kernel: delete it once the new
kernel's figures are in BENCHMARKS.md.

Its helpers (scores_log2, softmax_step, kv_operand) are unchanged in rdnac.kernels.attention and imported.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.attention import _LOG2E, _MAX, _MIN, AOT_DIVISIBLE, kv_operand, scores_log2, softmax_step

AOT_DIVISIBLE = {"_prefill_kernel_base": AOT_DIVISIBLE["_prefill_kernel"]}  # as built in plans


@triton.jit
def _prefill_kernel_base(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr, positions_ptr,
        sinks_ptr, out_ptr,
        stride_qt, stride_ot, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        scale, softcap, sliding_window, v_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
        HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr = False, PDL: tl.constexpr = False):
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
    q_off = (q_start + tok)[:, None] * stride_qt + head[:, None] * HEAD_DIM + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    pos = tl.load(positions_ptr + q_start + tok, mask=row_ok, other=0).to(tl.int32)  # [BLOCK_M]

    # Key range the whole tile can see; positions need not be sorted.
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_end = tl.minimum(seq_len, tl.reduce(tl.where(row_ok, pos, -1), 0, _MAX) + 1)
    if HAS_WINDOW:
        first = tl.reduce(tl.where(row_ok, pos, kv_end), 0, _MIN) - sliding_window + 1
        kv_lo = (tl.maximum(first, 0) // BLOCK_N) * BLOCK_N
        kv_full = kv_lo  # a window hides keys from some rows: every tile is masked
    else:
        kv_lo = 0
        # Keys every row of the tile sees (j <= the smallest position, j < seq_len): whole tiles
        # below this need no mask at all.
        seen_by_all = tl.minimum(seq_len, tl.reduce(tl.where(row_ok, pos, kv_end), 0, _MIN) + 1)
        kv_full = tl.maximum((seen_by_all // BLOCK_N) * BLOCK_N, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    # Interior tiles: every key visible to every row, no masks (the Triton interpreter and the GPU
    # both skip the masked softmax work).
    for start in range(kv_lo, kv_full, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        blk = tl.load(block_tables_ptr + seq * stride_bt + j // KV_BLOCK_SIZE).to(tl.int64)
        in_blk = j % KV_BLOCK_SIZE
        k_ptrs = k_cache_ptr + blk[:, None] * stride_kb + in_blk[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        v_ptrs = v_cache_ptr + blk[:, None] * stride_vb + in_blk[:, None] * stride_vs + kv_head * stride_vh + d[None, :]
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)  # [BLOCK_N, BLOCK_D]
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        k = kv_operand(k, q, KV_FP8)
        s = scores_log2(q, k, scale, softcap, HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        m_new, alpha, p, l_i = softmax_step(s, m_i, l_i, False)
        if BLOCK_D == HEAD_DIM:
            v = tl.load(v_ptrs)  # [BLOCK_N, BLOCK_D]
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        v = kv_operand(v, q, KV_FP8)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # Edge tiles: causal diagonal, sequence end, sliding window.
    for start in range(kv_full, kv_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        j_ok = j < kv_end
        blk = tl.load(block_tables_ptr + seq * stride_bt + j // KV_BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        in_blk = j % KV_BLOCK_SIZE
        # K rows as stored ([BLOCK_N, BLOCK_D], head dim contiguous: coalesced), transposed for the dot
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + in_blk[:, None] * stride_ks + kv_head * stride_kh
                    + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        k = kv_operand(k, q, KV_FP8)
        s = scores_log2(q, k, scale, softcap, HAS_SOFTCAP)  # [BLOCK_M, BLOCK_N]
        allowed = j_ok[None, :] & (j[None, :] <= pos[:, None])
        if HAS_WINDOW:
            allowed = allowed & (j[None, :] > pos[:, None] - sliding_window)
        m_new, alpha, p, l_i = softmax_step(tl.where(allowed, s, float("-inf")), m_i, l_i, True)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + in_blk[:, None] * stride_vs + kv_head * stride_vh
                    + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        v = kv_operand(v, q, KV_FP8)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

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
