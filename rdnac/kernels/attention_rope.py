"""Decode attention with its prologue fused in: implements the IR op `rope_cache_attention` (rdnac/ir/ops.py).

The op is `qk_norm_rope_cache` (q/k head RMSNorm, RoPE, KV-cache write) then
`attention`. At decode, one launch does both: program (seq, kv_head, split)
as `attention._decode_kernel`, but its inputs are the RAW q, k, v rows (column
views of the qkv GEMM output). Why: at a short context decode attention is
pure latency (a dependent chain position -> block table -> K -> dot -> V),
and the prologue was one more launch per layer. Here everything that does not
depend on the qkv GEMM runs BEFORE the PDL wait: position, seq_len, this
split's key range, cos/sin, the norm weights, the block-table entries and the
K and V tiles of the split's first key tile. After the wait only q, k, v are
loaded, normalized and rotated (op for op as `_qk_norm_rope_cache_kernel`,
with its roundings to the activation dtype), and the softmax runs as in
`_decode_kernel` (same operations, same order: the same bits as the unfused
pair wherever the hardware's reductions agree).

The new token's key (j == pos) is taken from registers in every tile, never
from the cache: no program reads the slot this launch writes. Split 0 of each
(seq, kv_head) stores k' and v into slot_mapping[seq] (slot < 0 is padding:
no store, and its key at j == pos is read from the cache as the unfused
attention does, so even padded rows give the unfused bits).

Prefill keeps two launches (`qk_norm_rope_cache`, then `attention_prefill`):
it is compute-bound, and its queries need other tokens' fresh keys. The
prefill rope launch's config travels nested in the node's config as
config["rope"] (select_kernels puts it there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels import attention, qk_norm_rope_cache
from rdnac.kernels.attention import _CACHE_STRIDES, _LOG2E, _MAX, _SUM, _decode_reduce_kernel
from rdnac.kernels.gemm import split_k_counters
from rdnac.kernels.launch import Launcher, next_power_of_2

AOT_DIVISIBLE = {"_rope_decode_kernel": ("stride_qt", "stride_kt", "stride_vt", "stride_ot", *_CACHE_STRIDES)}


@triton.jit
def _rope_decode_kernel(
        q_ptr, k_ptr, v_ptr, positions_ptr, slot_mapping_ptr, inv_freq_ptr, q_norm_ptr, k_norm_ptr,
        k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, sinks_ptr, out_ptr,
        part_max_ptr, part_sum_ptr, part_acc_ptr, counter_ptr,
        stride_qt, stride_kt, stride_vt, stride_ot, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_bt, scale, softcap, sliding_window, attention_scaling, eps,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        KV_BLOCK_SIZE: tl.constexpr, ROTARY_DIM: tl.constexpr, IS_NEOX: tl.constexpr, QK_NORM: tl.constexpr,
        UNIT_OFFSET: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
        SELF_REDUCE: tl.constexpr = False, PDL: tl.constexpr = False):
    in_dtype = q_ptr.dtype.element_ty
    act_dtype = out_ptr.dtype.element_ty  # q''s dtype in the unfused pair: the rope rounds to it
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kv_head * GROUP + g  # [BLOCK_G] query heads of this kv head
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    # ---- Before the PDL wait: nothing here depends on the previous kernel (the qkv GEMM). positions,
    # seq_lens, slot_mapping and block_tables are graph inputs, copied in before the step; inv_freq and
    # the norm weights are constants; the cache rows read here are keys j != pos, written by earlier
    # steps (a padded row's key at pos is its table's block 0, which nothing writes: slot -1).
    pos = tl.load(positions_ptr + seq).to(tl.int32)
    slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
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

    # The first key tile (all masked in an empty split, where it leaves the softmax state as it was).
    j = lo + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    j_ok = j < hi
    # the key this launch writes (a real row's key at pos) comes from registers, below; the slot is
    # broadcast before comparing: the interpreter rejects a scalar bool & a block
    is_real = (tl.full([BLOCK_N], 0, tl.int64) + slot) >= 0
    is_new = j_ok & (j == pos) & is_real
    blk = tl.load(block_tables_ptr + seq * stride_bt + j // KV_BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
    in_blk = j % KV_BLOCK_SIZE
    kv_mask = (j_ok & (is_new == 0))[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + in_blk[:, None] * stride_ks + kv_head * stride_kh
                + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + in_blk[:, None] * stride_vs + kv_head * stride_vh
                + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]

    # RoPE tables and norm weights, as _qk_norm_rope_cache_kernel computes them (formulas copied: the
    # interpreter cannot call a @triton.jit helper; keep the two kernels in step).
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
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + freq_index, mask=is_rotated, other=0.0)
    cos = (tl.cos(angle) * attention_scaling).to(act_dtype).to(tl.float32)  # [BLOCK_D]
    sin = (tl.sin(angle) * attention_scaling).to(act_dtype).to(tl.float32)
    if QK_NORM:
        w_q = tl.load(q_norm_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_D]
        w_q_partner = tl.load(q_norm_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        w_k = tl.load(k_norm_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        w_k_partner = tl.load(k_norm_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        if UNIT_OFFSET:
            w_q = (1.0 + w_q).to(in_dtype).to(tl.float32)
            w_q_partner = (1.0 + w_q_partner).to(in_dtype).to(tl.float32)
            w_k = (1.0 + w_k).to(in_dtype).to(tl.float32)
            w_k_partner = (1.0 + w_k_partner).to(in_dtype).to(tl.float32)

    if PDL:  # programmatic dependent launch: q, k, v are the previous kernel's output
        gdc_wait()

    # ---- q' [BLOCK_G, BLOCK_D] of the GROUP query heads, k' [1, BLOCK_D]: head RMSNorm and RoPE.
    q_mask = g_ok[:, None] & d_ok[None, :]
    q_rows = q_ptr + seq * stride_qt + head[:, None] * HEAD_DIM
    x = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    x_partner = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
    k_row = k_ptr + seq * stride_kt + kv_head * HEAD_DIM  # the k row of this kv head, loaded as [1, BLOCK_D]
    row_mask = d_ok[None, :]
    y = tl.load(k_row + d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    y_partner = tl.load(k_row + partner[None, :], mask=row_mask, other=0.0).to(tl.float32)
    if QK_NORM:
        rstd = tl.math.rsqrt(tl.reduce(x * x, 1, _SUM) / HEAD_DIM + eps)[:, None]  # [BLOCK_G, 1]
        x = (w_q * (x * rstd).to(in_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
        x_partner = (w_q_partner * (x_partner * rstd).to(in_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
        rstd_k = tl.math.rsqrt(tl.reduce(y * y, 1, _SUM) / HEAD_DIM + eps)[:, None]  # [1, 1]
        y = (w_k * (y * rstd_k).to(in_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
        y_partner = (w_k_partner * (y_partner * rstd_k).to(in_dtype).to(tl.float32)).to(act_dtype).to(tl.float32)
    a = (x * cos[None, :]).to(act_dtype).to(tl.float32)
    b = (x_partner * sin[None, :]).to(act_dtype).to(tl.float32)
    q = tl.where(is_rotated[None, :], a + sign[None, :] * b, x).to(act_dtype)
    q = tl.where(q_mask, q, 0.0).to(act_dtype)  # padded heads and dims are 0, as the unfused masked load gives
    a = (y * cos[None, :]).to(act_dtype).to(tl.float32)
    b = (y_partner * sin[None, :]).to(act_dtype).to(tl.float32)
    k_new = tl.where(is_rotated[None, :], a + sign[None, :] * b, y).to(act_dtype)
    k_new = k_new.to(k_cache_ptr.dtype.element_ty)  # [1, BLOCK_D], as the cache holds it
    v_row = v_ptr + seq * stride_vt + kv_head * HEAD_DIM
    v_new = tl.load(v_row + d[None, :], mask=row_mask, other=0.0).to(v_cache_ptr.dtype.element_ty)

    # One program per (seq, kv_head) writes the new key and value: split 0, whatever its key range. No
    # program reads that slot (the key at pos comes from registers), so the store races with nothing.
    if split == 0:
        store_mask = row_mask & ((tl.full([1, BLOCK_D], 0, tl.int64) + slot) >= 0)  # broadcast: see the rope kernel
        cache_block, cache_offset = slot // KV_BLOCK_SIZE, slot % KV_BLOCK_SIZE
        tl.store(k_cache_ptr + cache_block * stride_kb + cache_offset * stride_ks + kv_head * stride_kh + d[None, :],
                 k_new, mask=store_mask)
        tl.store(v_cache_ptr + cache_block * stride_vb + cache_offset * stride_vs + kv_head * stride_vh + d[None, :],
                 v_new, mask=store_mask)

    # ---- Online softmax, as _decode_kernel's loop; the first tile (loaded above) peeled off.
    qk_scale = scale * _LOG2E
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
    k = tl.where(is_new[:, None], k_new, k)
    v = tl.where(is_new[:, None], v_new, v)
    if HAS_SOFTCAP:
        s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_G, BLOCK_N]
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * _LOG2E
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
    allowed = j_ok
    if HAS_WINDOW:
        allowed = allowed & (j > pos - sliding_window)
    s = tl.where(allowed[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    m_i = m_new
    for start in range(lo + BLOCK_N, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        is_new = j_ok & (j == pos) & is_real
        blk = tl.load(block_tables_ptr + seq * stride_bt + j // KV_BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        in_blk = j % KV_BLOCK_SIZE
        kv_mask = (j_ok & (is_new == 0))[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + in_blk[:, None] * stride_ks + kv_head * stride_kh
                    + d[None, :], mask=kv_mask, other=0.0)
        k = tl.where(is_new[:, None], k_new, k)
        if HAS_SOFTCAP:
            s = tl.dot(q, tl.trans(k)) * scale
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)) * _LOG2E
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        allowed = j_ok
        if HAS_WINDOW:
            allowed = allowed & (j > pos - sliding_window)
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + in_blk[:, None] * stride_vs + kv_head * stride_vh
                    + d[None, :], mask=kv_mask, other=0.0)
        v = tl.where(is_new[:, None], v_new, v)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled (see _decode_kernel)
        gdc_launch_dependents()
    # ---- Epilogue: _decode_kernel's, unchanged (normalize, or partials and the SELF_REDUCE merge).
    if NUM_SPLITS == 1:
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + head, mask=g_ok, other=0.0).to(tl.float32) * _LOG2E
            m_f = tl.maximum(m_i, sink)
            alpha = tl.exp2(m_i - m_f)
            l_i = l_i * alpha + tl.exp2(sink - m_f)
            acc = acc * alpha[:, None]
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ot + head[:, None] * HEAD_DIM + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        part = (seq * num_heads + head) * NUM_SPLITS  # [BLOCK_G] first row of each head's [NUM_SPLITS] partials
        hd_ok = g_ok[:, None] & d_ok[None, :]
        tl.store(part_max_ptr + part + split, m_i, mask=g_ok)
        tl.store(part_sum_ptr + part + split, l_i, mask=g_ok)
        tl.store(part_acc_ptr + (part + split)[:, None] * HEAD_DIM + d[None, :], acc, mask=hd_ok)
        if SELF_REDUCE:  # counter[seq, kv_head] counts finished splits (0 between launches)
            tl.debug_barrier()  # every thread's partial is stored before the release below
            counter = counter_ptr + seq * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                # The last split merges _decode_reduce_kernel's way, op for op (.cg: through L2).
                m_all = tl.full([BLOCK_G], float("-inf"), tl.float32)
                for i in tl.static_range(NUM_SPLITS):  # (not `s`: the peeled tile's scores)
                    m_all = tl.maximum(m_all, tl.load(part_max_ptr + part + i, mask=g_ok, other=float("-inf"),
                                                      cache_modifier=".cg"))
                if HAS_SINKS:
                    sink = tl.load(sinks_ptr + head, mask=g_ok, other=0.0).to(tl.float32) * _LOG2E
                    m_all = tl.maximum(m_all, sink)
                m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
                total = tl.full([BLOCK_G], 0.0, tl.float32)
                out = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)
                for i in tl.static_range(NUM_SPLITS):
                    w = tl.exp2(tl.load(part_max_ptr + part + i, mask=g_ok, other=float("-inf"),
                                        cache_modifier=".cg") - m_safe)  # [BLOCK_G]
                    total += tl.load(part_sum_ptr + part + i, mask=g_ok, other=0.0, cache_modifier=".cg") * w
                    out += tl.load(part_acc_ptr + (part + i)[:, None] * HEAD_DIM + d[None, :], mask=hd_ok, other=0.0,
                                   cache_modifier=".cg") * w[:, None]
                if HAS_SINKS:
                    total += tl.exp2(sink - m_safe)
                out = out / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(out_ptr + seq * stride_ot + head[:, None] * HEAD_DIM + d[None, :],
                         out.to(out_ptr.dtype.element_ty), mask=hd_ok)
                tl.store(counter, 0)  # ready for the next launch (graph replays reuse the counters)


def _split_rest(rest: tuple[torch.Tensor, ...], qk_norm: bool) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """The op's trailing inputs: (q_norm, k_norm) exactly when qk_norm, then optional sinks."""
    num_norms = 2 if qk_norm else 0
    assert len(rest) in (num_norms, num_norms + 1), \
        f"rope_cache_attention takes {num_norms} norm weights (qk_norm={qk_norm}) and optional sinks; " \
        f"got {len(rest)} trailing inputs"
    return rest[:num_norms], (rest[num_norms] if len(rest) > num_norms else None)


def rope_cache_attention_decode(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor, *rest: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
        rotary_dim: int, theta: float, style: str = "neox", scaling: dict | None = None, qk_norm: bool = False,
        eps: float = 1e-6, unit_offset: bool = False, scale: float, sliding_window: int = 0, softcap: float = 0.0,
        inv_freq: torch.Tensor, attention_scaling: float, config: dict, launcher: Launcher) -> torch.Tensor:
    """One decode launch (plus `_decode_reduce_kernel` when NUM_SPLITS > 1 without SELF_REDUCE).

    q [B, Hq*D], k, v [B, Hk*D] raw (rows may be strided views of a qkv output), positions, slot_mapping,
    seq_lens [B], caches [NB, BS, Hk, D] (the new key and value are written in place), block_tables
    [B, MB], (q_norm, k_norm [D]), (sinks [Hq]) -> out [B, Hq*D]. cu_seqlens_q is arange(B + 1), not read.
    `theta` and `scaling` mirror the op; the kernel reads the precomputed inv_freq and attention_scaling."""
    norms, sinks = _split_rest(rest, qk_norm)
    assert style in ("neox", "gptj"), f"rope style must be 'neox' or 'gptj'; got {style!r}"
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim, f"bad rotary_dim {rotary_dim} for head_dim {head_dim}"
    assert inv_freq.shape == (rotary_dim // 2,) and inv_freq.dtype == torch.float32, \
        f"inv_freq must be float32 [{rotary_dim // 2}]; got {inv_freq.dtype} {tuple(inv_freq.shape)}"
    assert num_heads % num_kv_heads == 0, f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}"
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim), \
        f"caches must be [NB, BS, {num_kv_heads}, {head_dim}]; got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
    num_seqs = seq_lens.shape[0]
    assert q.shape == (num_seqs, num_heads * head_dim), \
        f"q must be [B={num_seqs}, {num_heads * head_dim}] (decode: one query per sequence); got {tuple(q.shape)}"
    assert k.shape == v.shape == (num_seqs, num_kv_heads * head_dim), \
        f"k and v must be [B={num_seqs}, {num_kv_heads * head_dim}]; got {tuple(k.shape)}, {tuple(v.shape)}"
    assert all(t.stride(-1) == 1 for t in (q, k, v, k_cache, v_cache, block_tables)), \
        "q, k, v, the caches and block_tables need a contiguous last dim"
    assert q.dtype == k.dtype == v.dtype, f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}"
    out_dtype = q.dtype  # q''s dtype, as qk_norm_rope_cache gives it
    if qk_norm:
        q_norm, k_norm = norms
        assert q_norm.shape == k_norm.shape == (head_dim,) and q_norm.is_contiguous() and k_norm.is_contiguous() \
            and q_norm.dtype == k_norm.dtype, f"q_norm and k_norm must be contiguous [{head_dim}] of one dtype"
        out_dtype = q.dtype if unit_offset else torch.promote_types(q.dtype, q_norm.dtype)
    else:
        q_norm = k_norm = q  # never read (QK_NORM=False)
    assert out_dtype == k_cache.dtype == v_cache.dtype, \
        f"attention needs q' and the caches in one dtype; got q' {out_dtype}, caches {k_cache.dtype}, {v_cache.dtype}"
    assert sinks is None or sinks.shape == (num_heads,), f"sinks must be [{num_heads}]; got {tuple(sinks.shape)}"
    out = torch.empty(num_seqs, num_heads * head_dim, dtype=out_dtype, device=q.device)  # [B, Hq*D]
    c = config["constexprs"]
    num_splits, block_n = c["NUM_SPLITS"], c["BLOCK_N"]
    self_reduce = bool(c.get("SELF_REDUCE", False)) and num_splits > 1  # see attention.py's docstring
    sinks_arg = q if sinks is None else sinks
    if num_splits > 1:  # float32 partials, fixed size for a given B and config (graph capture safe)
        part_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    else:
        part_max = part_sum = part_acc = out  # never touched
    counters = split_k_counters(q.device, num_seqs * num_kv_heads)  # read only with SELF_REDUCE
    group = num_heads // num_kv_heads
    block_d = next_power_of_2(head_dim)
    args = (q, k, v, positions, slot_mapping, inv_freq, q_norm, k_norm, k_cache, v_cache, block_tables, seq_lens,
            sinks_arg, out, part_max, part_sum, part_acc, counters,
            q.stride(0), k.stride(0), v.stride(0), out.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_tables.stride(0), float(scale), float(softcap), int(sliding_window), float(attention_scaling),
            float(eps))
    launcher.launch(_rope_decode_kernel, (num_seqs, num_kv_heads, num_splits), args,
                    constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "GROUP": group,
                                "BLOCK_G": max(16, next_power_of_2(group)), "KV_BLOCK_SIZE": k_cache.shape[1],
                                "ROTARY_DIM": rotary_dim, "IS_NEOX": style == "neox", "QK_NORM": bool(qk_norm),
                                "UNIT_OFFSET": bool(unit_offset), "HAS_SINKS": sinks is not None,
                                "HAS_SOFTCAP": softcap > 0, "HAS_WINDOW": sliding_window > 0,
                                "NUM_SPLITS": num_splits, "BLOCK_N": block_n, "SELF_REDUCE": self_reduce},
                    num_warps=config["num_warps"], num_stages=config["num_stages"])
    if num_splits > 1 and not self_reduce:
        launcher.launch(_decode_reduce_kernel, (num_seqs, num_heads),
                        (part_max, part_sum, part_acc, sinks_arg, out, out.stride(0)),
                        constexprs={"HEAD_DIM": head_dim, "BLOCK_D": block_d, "HAS_SINKS": sinks is not None,
                                    "NUM_SPLITS": num_splits},
                        num_warps=2, num_stages=1)
    return out


def rope_cache_attention_prefill(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor, *rest: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
        rotary_dim: int, theta: float, style: str = "neox", scaling: dict | None = None, qk_norm: bool = False,
        eps: float = 1e-6, unit_offset: bool = False, scale: float, sliding_window: int = 0, softcap: float = 0.0,
        inv_freq: torch.Tensor, attention_scaling: float, max_query_len: int, config: dict,
        launcher: Launcher) -> torch.Tensor:
    """Two launches: qk_norm_rope_cache with config["rope"], then attention_prefill with the rest of `config`."""
    norms, sinks = _split_rest(rest, qk_norm)
    assert "rope" in config, "a rope_cache_attention prefill config carries the rope launch's config as config['rope']"
    q_rot = qk_norm_rope_cache.qk_norm_rope_cache(
        q, k, v, positions, slot_mapping, k_cache, v_cache, *norms, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, rotary_dim=rotary_dim, theta=theta, style=style, scaling=scaling, qk_norm=qk_norm, eps=eps,
        unit_offset=unit_offset, inv_freq=inv_freq, attention_scaling=attention_scaling, config=config["rope"],
        launcher=launcher)
    return attention.attention_prefill(
        q_rot, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, positions, sinks, num_heads=num_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale, sliding_window=sliding_window, softcap=softcap,
        max_query_len=max_query_len, config=config, launcher=launcher)
