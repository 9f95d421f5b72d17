"""MLA attention on the paged latent cache: IR op `mla_attention` (rdnac/ir/mla.py) in its absorbed form.

Both phases run the latent form (the family record is in `rdnac.kernels.mla`):

    q_lat = q_nope @ W_UK            _head_gemm_kernel        [T, H, R]   (W_UK absorbed into the query)
    o_lat = softmax(s) @ latent      _mla_kernel (+ reduce)   [T, H, R]   s = q_lat . latent + rope(q_pe) . k_pe'
    out   = o_lat @ W_UV^T           _head_gemm_kernel        [T, H*Dv]

`_mla_kernel` is the paged attention of `attention.py` / `attention_decode.py`
with one kv head shared by every query head (MQA of H heads over R + Dr wide
keys) whose values are the keys' first R columns: each latent tile is loaded
once and is both operands. It rotates the queries' rope part itself
(`rope.rope_lanes`' arithmetic, so the bits are the reference's rounding).
Scores over R are summed in BLOCK_K chunks (a loop: a 512-wide query held
in a dot operand's layout spills on wave32), and a program accumulates
BLOCK_V of the R output columns (the grid's second axis counts R / BLOCK_V
slices; narrower slices recompute the scores but hold less).
Rows of a program's tile are (query token, head) pairs:

- decode (IS_DECODE): one query per sequence; program (b, head tile, split)
  takes a contiguous share of the key tiles, computed in-kernel from seq_lens
  (grid (B, cdiv(H, BLOCK_M) * slices, NUM_SPLITS): fixed by B and the config, so a
  captured graph replays for any seq_lens). With NUM_SPLITS > 1 the splits'
  float32 max/sum/acc go to a workspace and `_mla_reduce_kernel` (grid (B, H))
  merges them one after another; an empty split contributes nothing.
- prefill: row r of tile i of sequence b is query token r // H, head r % H
  (grid (B, cdiv(max_query_len * H, BLOCK_M) * slices)), causal by positions.

Prefill runs the absorbed form too: the expanded form needs every sequence's
context expanded to per-head K/V, whose size (the context lengths) only the
device knows; a host sync would break graph capture. passes/mla_forms.py
records this choice for GPU targets, so the plan graph states what runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.attention import _LOG2E, _MAX, softmax_step
from rdnac.kernels.launch import Launcher, cdiv, next_power_of_2

# Model-shape strides (never token counts), specialized on divisibility by 16 (see attention.py)
AOT_DIVISIBLE = {"_mla_kernel": ("stride_lt", "stride_qt", "stride_cb", "stride_cs", "stride_ot"),
                 "_head_gemm_kernel": ("K", "stride_xt", "stride_xh", "stride_yt", "stride_yh"),
                 "_mla_reduce_kernel": ("stride_ot",)}


@triton.jit
def _head_gemm_kernel(x_ptr, w_ptr, y_ptr, num_tokens, K, stride_xt, stride_xh, stride_yt, stride_yh,
                      N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr = False):
    """y[t, h, n] = sum_k x[t, h, k] * w[h, n, k] (w [H, N, K] contiguous), float32 accumulation in w's dtype.
    K is a runtime int (as `_mla_kernel`'s score loop bound): over a constexpr 512 Triton 3.6's LLVM unrolled
    the loop and spilled 16 registers on gfx1201 (W_UV's GEMM, N 128)."""
    if PDL:  # programmatic dependent launch: the next kernel's blocks may start; wait for the previous one
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < num_tokens
    n_ok = n < N
    acc = tl.full([BLOCK_T, BLOCK_N], 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_xt + head * stride_xh + k[None, :],
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_K]
        w = tl.load(w_ptr + head * N * K + n[:, None] * K + k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_K]
        acc += tl.dot(x.to(w.dtype), tl.trans(w))
    tl.store(y_ptr + t[:, None].to(tl.int64) * stride_yt + head * stride_yh + n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _mla_kernel(
        q_lat_ptr, q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr, positions_ptr, inv_freq_ptr,
        out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
        stride_lt, stride_qt, stride_cb, stride_cs, stride_bt, stride_ot, scale, attention_scaling, rank,
        NUM_HEADS: tl.constexpr, RANK: tl.constexpr, ROPE_DIM: tl.constexpr, QK_NOPE: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, IS_NEOX: tl.constexpr,
        IS_DECODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_V: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # programmatic dependent launch: wait for the previous kernel (the trigger is after the loop)
        gdc_wait()
    V_TILES: tl.constexpr = BLOCK_R // BLOCK_V
    seq = tl.program_id(0)
    split = tl.program_id(2)
    v_tile = tl.program_id(1) % V_TILES  # this program's BLOCK_V output columns of the latent
    if IS_DECODE:  # one query per sequence: q row `seq`, rows of the tile are heads
        q_start = seq
        head = (tl.program_id(1) // V_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        tok = tl.full([BLOCK_M], 0, tl.int32)
        row_ok = head < NUM_HEADS
    else:
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        tile = tl.num_programs(1) // V_TILES - 1 - tl.program_id(1) // V_TILES  # heaviest tiles first
        if tile * BLOCK_M >= q_len * NUM_HEADS:  # max_query_len covers the longest sequence only
            return
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = rows // NUM_HEADS
        head = rows % NUM_HEADS
        row_ok = tok < q_len
    token = (q_start + tok).to(tl.int64)  # [BLOCK_M]
    pos = tl.load(positions_ptr + token, mask=row_ok, other=0).to(tl.int32)
    q_lat_row = q_lat_ptr + token[:, None] * stride_lt + head[:, None] * RANK  # [BLOCK_M, 1]

    # The rope part of each query head, rotated at its position: rope_lanes' arithmetic per row (cos and sin
    # rounded to q's dtype, each product rounded before the sum), as the reference's `rotate`.
    act = q_ptr.dtype.element_ty
    e = tl.arange(0, BLOCK_DR)
    e_ok = e < ROPE_DIM
    HALF: tl.constexpr = ROPE_DIM // 2
    if IS_NEOX:
        freq_index = e % HALF
        partner = tl.where(e < HALF, e + HALF, e - HALF)
        sign = tl.where(e < HALF, -1.0, 1.0)
    else:
        freq_index = e // 2
        partner = e ^ 1
        sign = tl.where(e % 2 == 0, -1.0, 1.0)
    partner = tl.where(e_ok, partner, e)
    angle = pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + freq_index, mask=e_ok, other=0.0)[None, :]
    cos = (tl.cos(angle) * attention_scaling).to(act).to(tl.float32)  # [BLOCK_M, BLOCK_DR]
    sin = (tl.sin(angle) * attention_scaling).to(act).to(tl.float32)
    he_ok = row_ok[:, None] & e_ok[None, :]
    q_row = q_ptr + token[:, None] * stride_qt + head[:, None] * (QK_NOPE + ROPE_DIM) + QK_NOPE
    x = tl.load(q_row + e[None, :], mask=he_ok, other=0.0).to(tl.float32)
    x_partner = tl.load(q_row + partner[None, :], mask=he_ok, other=0.0).to(tl.float32)
    q_pe = ((x * cos).to(act).to(tl.float32) + sign[None, :] * (x_partner * sin).to(act).to(tl.float32))
    q_pe = q_pe.to(q_lat_ptr.dtype.element_ty)  # [BLOCK_M, BLOCK_DR]

    # The keys this program sees: up to the tile's last query position; in decode its split's share.
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_end = tl.minimum(seq_len, tl.reduce(tl.where(row_ok, pos, -1), 0, _MAX) + 1)
    num_tiles = (tl.maximum(kv_end, 0) + BLOCK_N - 1) // BLOCK_N
    tiles_per_split = (num_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(kv_end, lo + tiles_per_split * BLOCK_N)
    table_row = block_tables_ptr + seq * stride_bt

    v = v_tile * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V] output columns
    v_ok = v < RANK
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_V], 0.0, tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        j_ok = j < hi
        blk = tl.load(table_row + j // KV_BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
        entry = cache_ptr + blk * stride_cb + (j % KV_BLOCK_SIZE) * stride_cs  # [BLOCK_N] latent rows
        k_pe = tl.load(entry[:, None] + RANK + e[None, :], mask=j_ok[:, None] & e_ok[None, :], other=0.0)
        s = tl.dot(q_pe, tl.trans(k_pe))  # [BLOCK_M, BLOCK_N]
        # q_lat . latent over R in BLOCK_K chunks, the query's chunk read again (from cache) each time: a
        # whole 512-wide query held in a dot's operand layout spills on wave32 targets. The bound is the
        # runtime `rank`, not a constexpr: over a constant trip count LLVM (Triton 3.6's AMD backend) unrolls
        # this loop and hoists the 8 query chunks out of the key loop, which spilled 75-212 registers on
        # gfx1201 for every tile (prefill and decode, 16 heads of 576); with the runtime bound it stays a loop.
        for c in range(0, rank, BLOCK_K):
            r = c + tl.arange(0, BLOCK_K)
            q_c = tl.load(q_lat_row + r[None, :], mask=row_ok[:, None] & (r < RANK)[None, :], other=0.0)
            k_c = tl.load(entry[:, None] + r[None, :], mask=j_ok[:, None] & (r < RANK)[None, :], other=0.0)
            s += tl.dot(q_c, tl.trans(k_c))
        s = s * (scale * _LOG2E)
        allowed = j_ok[None, :] & (j[None, :] <= pos[:, None])
        m_new, alpha, p, l_i = softmax_step(tl.where(allowed, s, float("-inf")), m_i, l_i, True)
        values = tl.load(entry[:, None] + v[None, :], mask=j_ok[:, None] & v_ok[None, :], other=0.0)  # the latents
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        m_i = m_new

    if PDL:  # the main loop is done: let the next kernel's blocks be scheduled
        gdc_launch_dependents()
    hv_ok = row_ok[:, None] & v_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * RANK + v[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hv_ok)
    else:  # decode only: this split's partials, merged by _mla_reduce_kernel
        part = (seq * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_M]
        first_slice = row_ok & (tok + v_tile == 0)  # [BLOCK_M]: every slice has the same max and sum
        tl.store(part_max_ptr + part, m_i, mask=first_slice)
        tl.store(part_sum_ptr + part, l_i, mask=first_slice)
        tl.store(part_acc_ptr + part[:, None].to(tl.int64) * RANK + v[None, :], acc, mask=hv_ok)


@triton.jit
def _mla_reduce_kernel(part_max_ptr, part_sum_ptr, part_acc_ptr, out_ptr, stride_ot, NUM_HEADS: tl.constexpr,
                       RANK: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SPLITS: tl.constexpr,
                       PDL: tl.constexpr = False):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < RANK
    part = (seq * NUM_HEADS + head) * NUM_SPLITS  # first of this head's [NUM_SPLITS] partials
    m_all = tl.full([], float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(part_max_ptr + part + s))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    total = tl.full([], 0.0, tl.float32)
    out = tl.full([BLOCK_R], 0.0, tl.float32)
    for s in tl.static_range(NUM_SPLITS):  # one split after another (attention_decode's order)
        w = tl.exp2(tl.load(part_max_ptr + part + s) - m_safe)  # empty splits (max -inf) weigh 0
        total += tl.load(part_sum_ptr + part + s) * w
        out += tl.load(part_acc_ptr + (part + s).to(tl.int64) * RANK + r, mask=r_ok, other=0.0) * w
    out = out / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * RANK + r, out.to(out_ptr.dtype.element_ty), mask=r_ok)


# ---------------------------------------------------------------- wrappers

GEMM_CONFIG = {"BLOCK_T": 16, "num_warps": 4, "num_stages": 2}  # small per-head GEMMs: fits every target


def head_gemm(x: torch.Tensor, stride_xt: int, stride_xh: int, w: torch.Tensor, y: torch.Tensor, stride_yt: int,
              stride_yh: int, launcher: Launcher) -> None:
    """y[t, h, :N] = x[t, h, :K] @ w[h]^T for w [H, N, K], x and y addressed by their strides."""
    num_heads, n, k = w.shape
    assert w.is_contiguous(), "mla: per-head weights must be contiguous [H, N, K]"
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return
    block_n, block_k = min(64, max(16, next_power_of_2(n))), min(64, max(16, next_power_of_2(k)))
    grid = (cdiv(num_tokens, GEMM_CONFIG["BLOCK_T"]), num_heads, cdiv(n, block_n))
    launcher.launch(_head_gemm_kernel, grid, (x, w, y, num_tokens, k, stride_xt, stride_xh, stride_yt, stride_yh),
                    constexprs={"N": n, "BLOCK_T": GEMM_CONFIG["BLOCK_T"], "BLOCK_N": block_n, "BLOCK_K": block_k},
                    num_warps=GEMM_CONFIG["num_warps"], num_stages=GEMM_CONFIG["num_stages"])


def _attend(q, latent_cache, block_tables, seq_lens, cu_seqlens_q, positions, w_uk, w_uv, *, num_heads,
            qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank, scale, style, inv_freq,
            attention_scaling, is_decode, max_query_len, config, launcher) -> torch.Tensor:
    heads, dn, dr, dv, rank = num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank
    num_tokens = q.shape[0]
    assert q.dim() == 2 and q.shape[1] == heads * (dn + dr) and q.stride(1) == 1, (q.shape, q.stride())
    assert latent_cache.shape[2] == rank + dr and latent_cache.stride(2) == 1 and block_tables.stride(1) == 1
    assert q.dtype == latent_cache.dtype, (q.dtype, latent_cache.dtype)
    assert w_uk is not None and w_uv is not None, "mla_attention on GPU runs the absorbed form: w_uk and w_uv"
    q_lat = torch.empty(num_tokens, heads, rank, dtype=q.dtype, device=q.device)  # [T, H, R]
    o_lat = torch.empty(num_tokens, heads, rank, dtype=q.dtype, device=q.device)  # [T, H, R]
    out = torch.empty(num_tokens, heads * dv, dtype=q.dtype, device=q.device)  # [T, H*Dv]
    if num_tokens == 0:
        return out
    head_gemm(q, q.stride(0), dn + dr, w_uk, q_lat, heads * rank, rank, launcher)  # q_nope @ W_UK
    c = config["constexprs"]
    num_seqs, block_m = seq_lens.shape[0], c["BLOCK_M"]
    num_splits = c.get("NUM_SPLITS", 1) if is_decode else 1
    width = block_r(rank)
    block_k, block_v = min(c.get("BLOCK_K", width), width), min(c.get("BLOCK_V", width), width)
    v_tiles = width // block_v
    if is_decode:
        assert num_tokens == num_seqs, f"MLA decode needs one query per sequence; got T={num_tokens}, B={num_seqs}"
        grid = (num_seqs, cdiv(heads, block_m) * v_tiles, num_splits)
    else:
        grid = (num_seqs, cdiv(max_query_len * heads, block_m) * v_tiles, 1)
    if num_splits > 1:  # float32 partials, fixed size for a given B and config (graph capture safe)
        part_max = torch.empty(num_seqs, heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, heads, num_splits, rank, dtype=torch.float32, device=q.device)
    else:
        part_max = part_sum = part_acc = o_lat  # never touched
    args = (q_lat, q, latent_cache, block_tables, seq_lens, cu_seqlens_q, positions, inv_freq, o_lat,
            part_max, part_sum, part_acc, q_lat.stride(0), q.stride(0), latent_cache.stride(0),
            latent_cache.stride(1), block_tables.stride(0), o_lat.stride(0), float(scale), float(attention_scaling),
            rank)  # the score chunks' loop bound, at run time (see the kernel)
    launcher.launch(_mla_kernel, grid, args, constexprs={
        **shape_constexprs(heads, rank, dr, dn, latent_cache.shape[1]), "IS_NEOX": style == "neox",
        "IS_DECODE": is_decode, "BLOCK_M": block_m, "BLOCK_N": c["BLOCK_N"], "BLOCK_K": block_k, "BLOCK_V": block_v,
        "NUM_SPLITS": num_splits},
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if num_splits > 1:
        launcher.launch(_mla_reduce_kernel, (num_seqs, heads), (part_max, part_sum, part_acc, o_lat, o_lat.stride(0)),
                        constexprs={"NUM_HEADS": heads, "RANK": rank, "BLOCK_R": block_r(rank),
                                    "NUM_SPLITS": num_splits}, num_warps=4, num_stages=1)
    head_gemm(o_lat, heads * rank, rank, w_uv, out, out.stride(0), dv, launcher)  # o_lat @ W_UV^T
    return out


def block_r(rank: int) -> int:
    return max(16, next_power_of_2(rank))


def shape_constexprs(heads: int, rank: int, dr: int, dn: int, kv_block_size: int) -> dict:
    return {"NUM_HEADS": heads, "RANK": rank, "ROPE_DIM": dr, "QK_NOPE": dn, "BLOCK_R": block_r(rank),
            "BLOCK_DR": max(16, next_power_of_2(dr)), "KV_BLOCK_SIZE": kv_block_size}


def mla_attention_prefill(q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, positions: torch.Tensor,
                          kv_b: torch.Tensor, w_uk: torch.Tensor | None = None, w_uv: torch.Tensor | None = None, *,
                          max_query_len: int, config: dict, launcher: Launcher, **attrs) -> torch.Tensor:
    """Varlen (chunked) prefill on the latent cache; `max_query_len` (host int) bounds the grid."""
    return _attend(q, latent_cache, block_tables, seq_lens, cu_seqlens_q, positions, w_uk, w_uv, **_kernel_attrs(attrs),
                   is_decode=False, max_query_len=max_query_len, config=config, launcher=launcher)


def mla_attention_decode(q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, positions: torch.Tensor,
                         kv_b: torch.Tensor, w_uk: torch.Tensor | None = None, w_uv: torch.Tensor | None = None, *,
                         config: dict, launcher: Launcher, **attrs) -> torch.Tensor:
    """Split-KV decode: q row b is sequence b's one query (cu_seqlens_q is not read)."""
    return _attend(q, latent_cache, block_tables, seq_lens, cu_seqlens_q, positions, w_uk, w_uv, **_kernel_attrs(attrs),
                   is_decode=True, max_query_len=1, config=config, launcher=launcher)


def _kernel_attrs(attrs: dict) -> dict:
    """The node's attrs the kernels read; theta/scaling reach them as the precomputed RoPE tables, and
    the forms are checked at kernel selection (both absorbed on GPU)."""
    keys = ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "scale",
            "inv_freq", "attention_scaling")
    return {"style": attrs.get("style", "gptj"), **{k: attrs[k] for k in keys}}
