"""The gated delta rule (Gated DeltaNet): implements IR op `gated_delta_rule` (rdnac.ir.linear_attention),
chunked for prefill, recurrent for decode, with the float32 state in per-sequence slots.

Every kernel applies the op's preamble itself: q and k L2-normalised per head
(eps 1e-6), q scaled by Dk^-0.5, beta = sigmoid(b) (rounded to b's dtype),
g = -exp(A_log) * softplus(a + dt_bias); value head h reads q/k head
h // (Hv/Hk). A chunk reads its slot's state unless it starts its sequence
(seq_lens[b] == its length) or the slot is -1 (zeros); it writes the slot
unless the slot is -1.

Prefill (any ragged batch of chunks), two launches, the WY form of
flash-linear-attention's chunk_gated_delta_rule over blocks of CHUNK tokens
counted from each chunk's first token (the op's chunk_size, 64, first; a
smaller CHUNK, offered where 64 spills, gives the same result to float32
rounding):

1. `_gdn_chunk_prepare_kernel`, grid (B, cdiv(max_query_len, CHUNK), Hv),
   every block of every sequence in parallel, what needs no state:
   T = (I + A)^-1 with A the strictly lower part of (k beta k^T) *
   exp(cum_i - cum_j), by forward substitution one row at a time (a product
   of (I + A^(2^n)) factors would be shorter, but its intermediate powers
   grow combinatorially when keys align and cancel in float32), and the
   causal scores P = (q k^T) * exp(cum_i - cum_j), j <= i; both per token
   row in a workspace [T, Hv, 2 * CHUNK] of the dots' operand dtype (below).
2. `_gdn_chunk_scan_kernel`, grid (B, Hv, cdiv(Dv, BLOCK_V)): each program
   keeps its [Dk, BLOCK_V] slice of the state in registers and walks the
   sequence's blocks in order: v_new = T (v beta - (k beta e^cum) S),
   o = (q e^cum) S + P v_new, S = e^cum_last S + (k e^(cum_last - cum))^T
   v_new. Value columns are independent in the delta rule, so the programs
   of one head share nothing but the workspace.

Decode (one token per sequence, row b is sequence b): `_gdn_decode_kernel`,
grid (B, Hv, cdiv(Dv, BLOCK_V)), the recurrent form S = e^g S;
S += k (beta (v - S^T k))^T; o = S^T q, the slice updated in place. Grids
depend only on shapes, the slots are read on the device: graph-capturable.

Dots accumulate in float32; their operands are IEEE float32 in float32
models and rounded to the model's 16-bit dtype otherwise (as
flash-linear-attention does: matrix units, and float32 FMA dots hold whole
operand rows per thread and spill). The state and every elementwise step
stay float32. A program stores its state slice after a barrier, so no
thread overwrites what another has yet to read.

Config space: BLOCK_V (value columns per program), num_warps, and CHUNK at prefill.
Problem keys: {"phase", "num_k_heads", "num_v_heads", "k_head_dim",
"v_head_dim", "chunk_size", "dtype", "num_seqs", "num_tokens"}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from rdnac.kernels.launch import Launcher, aligned, cdiv, next_power_of_2

_SUM = tl.standard._sum_combine  # tl.sum / tl.cumsum are jit functions; see rms_norm.py

# Row strides are model-shape ints (the width of the projection a view was split from, or Hv for an aligned
# copy of the gates): binaries specialize on their divisibility by 16. The jit helpers take the caller's.
AOT_DIVISIBLE = {name: ("stride_q", "stride_k", "stride_v", "stride_o", "stride_a", "stride_b")
                 for name in ("_gdn_chunk_scan_kernel", "_gdn_decode_kernel")}
AOT_DIVISIBLE["_gdn_chunk_prepare_kernel"] = ("stride_q", "stride_k", "stride_a", "stride_b")
AOT_DIVISIBLE["_gates"] = ("stride_a", "stride_b")
AOT_DIVISIBLE["_l2_normed"] = ("stride",)


@triton.jit
def _gates(a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, rows, row_ok, stride_a, stride_b, head):
    """(g, beta) float32 of value head `head` at token rows `rows`; 0 for rows not in the chunk, so padded
    positions neither decay nor update the state (the reference pads with zeros)."""
    a = tl.load(a_ptr + rows * stride_a + head, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + rows * stride_b + head, mask=row_ok, other=0.0)
    beta = (1.0 / (1.0 + tl.exp(-b.to(tl.float32)))).to(b.dtype).to(tl.float32)  # sigmoid in b's dtype, then float32
    x = a + tl.load(dt_bias_ptr + head).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))  # F.softplus, threshold 20
    g = -tl.exp(tl.load(A_log_ptr + head).to(tl.float32)) * softplus
    return tl.where(row_ok, g, 0.0), tl.where(row_ok, beta, 0.0)


@triton.jit
def _l2_normed(ptr, rows, row_ok, stride, head, DK: tl.constexpr, BLOCK_K: tl.constexpr):
    """[rows, BLOCK_K] float32: head `head`'s vectors, L2-normalised (eps 1e-6); zero rows outside."""
    d = tl.arange(0, BLOCK_K)
    x = tl.load(ptr + rows[:, None] * stride + head * DK + d[None, :], mask=row_ok[:, None] & (d < DK)[None, :],
                other=0.0).to(tl.float32)
    return x * tl.math.rsqrt(tl.reduce(x * x, 1, _SUM) + 1e-6)[:, None]


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b accumulated in float32: IEEE float32 for float32 models; else on operands rounded to the model's
    16-bit dtype, which matrix units take (float32 FMA dots hold whole operand rows per thread and spill)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def _chunk(cu_seqlens_ptr, seq_lens_ptr, slots_ptr, seq):
    """(first token, length, slot, whether the chunk reads its slot) of sequence `seq`'s chunk."""
    start = tl.load(cu_seqlens_ptr + seq)
    length = tl.load(cu_seqlens_ptr + seq + 1) - start
    slot = tl.load(slots_ptr + seq)
    return start, length, slot, (slot >= 0) & (tl.load(seq_lens_ptr + seq) != length)


@triton.jit
def _gdn_chunk_prepare_kernel(q_ptr, k_ptr, a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, slots_ptr, seq_lens_ptr,
                              cu_seqlens_ptr, work_ptr, stride_q, stride_k, stride_a, stride_b, scale,
                              GROUP: tl.constexpr, DK: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                              PDL: tl.constexpr = False):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)
    first = tl.program_id(1) * CHUNK  # chunk-relative first token of this block
    head = tl.program_id(2)
    num_heads = tl.num_programs(2)
    start, length, slot, reads_state = _chunk(cu_seqlens_ptr, seq_lens_ptr, slots_ptr, seq)
    r = tl.arange(0, CHUNK)
    row_ok = first + r < length
    rows = (start + first + r).to(tl.int64)  # [CHUNK]
    k = _l2_normed(k_ptr, rows, row_ok, stride_k, head // GROUP, DK, BLOCK_K)  # [CHUNK, BLOCK_K]
    g, beta = _gates(a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, rows, row_ok, stride_a, stride_b, head)
    cum = tl.associative_scan(g, 0, _SUM)  # [CHUNK] log decay from the block's start
    # at[j, i] = A[i, j] = (k_i beta_i . k_j) exp(cum_i - cum_j) for j < i: held transposed so that row i of A
    # comes out of a reduction as a vector over the rows of T
    is_below = r[:, None] < r[None, :]
    at = _dot(k, tl.trans(k * beta[:, None]), k_ptr.dtype.element_ty)
    at = at * tl.exp(tl.where(is_below, cum[None, :] - cum[:, None], float("-inf")))
    inv = tl.where(r[:, None] == r[None, :], 1.0, 0.0)  # [CHUNK, CHUNK]: rows of (I + A)^-1, row i at step i
    for i in range(1, CHUNK):
        a_i = tl.reduce(tl.where(r[None, :] == i, at, 0.0), 1, _SUM)  # [CHUNK] A[i, j] over j
        inv = tl.where(r[:, None] == i, inv - tl.reduce(a_i[:, None] * inv, 0, _SUM)[None, :], inv)
    block = work_ptr + (rows[:, None] * num_heads + head) * (2 * CHUNK) + r[None, :]  # [CHUNK, CHUNK] pointers
    tl.store(block, inv.to(work_ptr.dtype.element_ty), mask=row_ok[:, None])
    # the block's causal scores (q_i . k_j) exp(cum_i - cum_j), j <= i, q scaled: they need no state either
    q = _l2_normed(q_ptr, rows, row_ok, stride_q, head // GROUP, DK, BLOCK_K) * scale
    scores = _dot(q, tl.trans(k), k_ptr.dtype.element_ty)
    scores = scores * tl.exp(tl.where(r[None, :] <= r[:, None], cum[:, None] - cum[None, :], float("-inf")))
    tl.store(block + CHUNK, scores.to(work_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _gdn_chunk_scan_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, state_ptr, slots_ptr,
                           seq_lens_ptr, cu_seqlens_ptr, work_ptr, out_ptr,
                           stride_q, stride_k, stride_v, stride_a, stride_b, stride_o, scale,
                           GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_V: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    start, length, slot, reads_state = _chunk(cu_seqlens_ptr, seq_lens_ptr, slots_ptr, seq)
    DT: tl.constexpr = q_ptr.dtype.element_ty
    dk = tl.arange(0, BLOCK_K)
    dv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    dv_ok = dv < DV
    # scalar conditions enter masks as bounds: the Triton interpreter turns `vector & scalar bool` into int32
    reads = (dk < tl.where(reads_state, DK, 0))[:, None] & dv_ok[None, :]
    writes = (dk < tl.where(slot >= 0, DK, 0))[:, None] & dv_ok[None, :]
    state_tile = state_ptr + ((slot.to(tl.int64) * num_heads + head) * DK + dk[:, None]) * DV + dv[None, :]
    S = tl.load(state_tile, mask=reads, other=0.0)  # [BLOCK_K, BLOCK_V]
    r = tl.arange(0, CHUNK)
    for first in range(0, length, CHUNK):
        row_ok = first + r < length
        rows = (start + first + r).to(tl.int64)  # [CHUNK]
        g, beta = _gates(a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, rows, row_ok, stride_a, stride_b, head)
        cum = tl.associative_scan(g, 0, _SUM)  # [CHUNK]
        cum_last = tl.reduce(tl.where(r == CHUNK - 1, cum, 0.0), 0, _SUM)  # padded rows add 0: the last token's
        # operands leave float32 as soon as they are formed: fewer live registers (see _dot)
        k = _l2_normed(k_ptr, rows, row_ok, stride_k, head // GROUP, DK, BLOCK_K)  # [CHUNK, BLOCK_K]
        k_beta = (k * (beta * tl.exp(cum))[:, None]).to(DT)
        k_to_end = (k * tl.exp(cum_last - cum)[:, None]).to(DT)
        v = tl.load(v_ptr + rows[:, None] * stride_v + head * DV + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                    other=0.0).to(tl.float32)  # [CHUNK, BLOCK_V]
        block = work_ptr + (rows[:, None] * num_heads + head) * (2 * CHUNK) + r[None, :]  # this block's T and P rows
        inv = tl.load(block, mask=row_ok[:, None], other=0.0)  # [CHUNK, CHUNK]
        # the block's updates, less what the state already predicts: T (v beta - (k beta e^cum) S)
        v_new = _dot(inv, v * beta[:, None] - _dot(k_beta, S, DT), DT)  # [CHUNK, BLOCK_V]
        q = _l2_normed(q_ptr, rows, row_ok, stride_q, head // GROUP, DK, BLOCK_K) * (scale * tl.exp(cum))[:, None]
        scores = tl.load(block + CHUNK, mask=row_ok[:, None], other=0.0)  # [CHUNK, CHUNK]
        o = _dot(q.to(DT), S, DT) + _dot(scores, v_new, DT)
        tl.store(out_ptr + rows[:, None] * stride_o + head * DV + dv[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])
        S = S * tl.exp(cum_last) + _dot(tl.trans(k_to_end), v_new, DT)
    tl.debug_barrier()  # every thread has read the old state
    tl.store(state_tile, S, mask=writes)


@triton.jit
def _gdn_decode_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, A_log_ptr, dt_bias_ptr, state_ptr, slots_ptr,
                       seq_lens_ptr, out_ptr, stride_q, stride_k, stride_v, stride_a, stride_b, stride_o, scale,
                       GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_V: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    seq = tl.program_id(0)  # row `seq` of the step is sequence `seq`'s one token
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    slot = tl.load(slots_ptr + seq)
    reads_state = (slot >= 0) & (tl.load(seq_lens_ptr + seq) != 1)
    dk = tl.arange(0, BLOCK_K)
    dv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    dv_ok = dv < DV
    # scalar conditions enter masks as bounds: the Triton interpreter turns `vector & scalar bool` into int32
    reads = (dk < tl.where(reads_state, DK, 0))[:, None] & dv_ok[None, :]
    writes = (dk < tl.where(slot >= 0, DK, 0))[:, None] & dv_ok[None, :]
    state_tile = state_ptr + ((slot.to(tl.int64) * num_heads + head) * DK + dk[:, None]) * DV + dv[None, :]
    S = tl.load(state_tile, mask=reads, other=0.0)  # [BLOCK_K, BLOCK_V]
    row = seq.to(tl.int64)
    k = tl.load(k_ptr + row * stride_k + (head // GROUP) * DK + dk, mask=dk < DK, other=0.0).to(tl.float32)
    k = k * tl.math.rsqrt(tl.reduce(k * k, 0, _SUM) + 1e-6)
    q = tl.load(q_ptr + row * stride_q + (head // GROUP) * DK + dk, mask=dk < DK, other=0.0).to(tl.float32)
    q = q * tl.math.rsqrt(tl.reduce(q * q, 0, _SUM) + 1e-6) * scale
    v = tl.load(v_ptr + row * stride_v + head * DV + dv, mask=dv_ok, other=0.0).to(tl.float32)  # [BLOCK_V]
    a = tl.load(a_ptr + row * stride_a + head).to(tl.float32)
    b = tl.load(b_ptr + row * stride_b + head)
    beta = (1.0 / (1.0 + tl.exp(-b.to(tl.float32)))).to(b.dtype).to(tl.float32)
    x = a + tl.load(dt_bias_ptr + head).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    g = -tl.exp(tl.load(A_log_ptr + head).to(tl.float32)) * softplus
    S = S * tl.exp(g)
    predicted = tl.reduce(S * k[:, None], 0, _SUM)  # [BLOCK_V]: what the state recalls for k
    S = S + k[:, None] * ((v - predicted) * beta)[None, :]
    o = tl.reduce(S * q[:, None], 0, _SUM)
    tl.store(out_ptr + row * stride_o + head * DV + dv, o.to(out_ptr.dtype.element_ty), mask=dv_ok)
    tl.debug_barrier()  # every thread has read the old state
    tl.store(state_tile, S, mask=writes)


def _check(q, k, v, a, b, state, num_k_heads, num_v_heads, k_head_dim, v_head_dim):
    for t in (q, k, v, a, b):
        assert t.stride(-1) == 1, "gated_delta_rule reads rows with unit column stride"
    assert state.is_contiguous() and state.dtype == torch.float32
    assert tuple(state.shape[1:]) == (num_v_heads, k_head_dim, v_head_dim)
    assert num_v_heads % num_k_heads == 0


def _constexprs(num_k_heads, num_v_heads, k_head_dim, v_head_dim, config):
    return {"GROUP": num_v_heads // num_k_heads, "DK": k_head_dim, "DV": v_head_dim,
            "BLOCK_K": max(16, next_power_of_2(k_head_dim)), "BLOCK_V": config["constexprs"]["BLOCK_V"]}


def gated_delta_rule_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                             A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
                             state_slots: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                             num_k_heads: int, num_v_heads: int, k_head_dim: int, v_head_dim: int,
                             chunk_size: int = 64, max_query_len: int, config: dict,
                             launcher: Launcher) -> torch.Tensor:
    """q, k [T, Hk*Dk], v [T, Hv*Dv], a, b [T, Hv] (rows may be strided), A_log, dt_bias [Hv], state
    [NS, Hv, Dk, Dv] float32 (written in place) -> [T, Hv*Dv] in q's dtype. `max_query_len` (host int)
    bounds the longest chunk."""
    _check(q, k, v, a, b, state, num_k_heads, num_v_heads, k_head_dim, v_head_dim)
    a, b = aligned(a), aligned(b)  # [T, Hv] columns of a merged projection: small, maybe at an odd offset
    num_tokens, num_seqs = q.shape[0], state_slots.shape[0]
    out = torch.empty(num_tokens, num_v_heads * v_head_dim, dtype=q.dtype, device=q.device)  # [T, Hv*Dv]
    if num_tokens == 0 or num_seqs == 0:
        return out
    cx = _constexprs(num_k_heads, num_v_heads, k_head_dim, v_head_dim, config)
    chunk = config["constexprs"]["CHUNK"]
    scale = float(k_head_dim ** -0.5)
    # per token row and value head: its row of the block's T, then of its scores P; in the dots' operand dtype,
    # the scan's only use of them, so a 16-bit model's workspace loses nothing by being 16-bit
    work = torch.empty(num_tokens, num_v_heads, 2 * chunk, dtype=q.dtype, device=q.device)  # [T, Hv, 2C]
    warps, stages = config["num_warps"], config["num_stages"]
    launcher.launch(_gdn_chunk_prepare_kernel, (num_seqs, cdiv(max(max_query_len, 1), chunk), num_v_heads),
                    (q, k, a, b, A_log, dt_bias, state_slots, seq_lens, cu_seqlens_q, work,
                     q.stride(0), k.stride(0), a.stride(0), b.stride(0), scale),
                    constexprs={"GROUP": cx["GROUP"], "DK": k_head_dim, "BLOCK_K": cx["BLOCK_K"], "CHUNK": chunk},
                    num_warps=warps, num_stages=stages)
    launcher.launch(_gdn_chunk_scan_kernel, (num_seqs, num_v_heads, cdiv(v_head_dim, cx["BLOCK_V"])),
                    (q, k, v, a, b, A_log, dt_bias, state, state_slots, seq_lens, cu_seqlens_q, work, out,
                     q.stride(0), k.stride(0), v.stride(0), a.stride(0), b.stride(0), out.stride(0), scale),
                    constexprs={**cx, "CHUNK": chunk}, num_warps=warps, num_stages=stages)
    return out


def gated_delta_rule_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            A_log: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor,
                            state_slots: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, *,
                            num_k_heads: int, num_v_heads: int, k_head_dim: int, v_head_dim: int,
                            chunk_size: int = 64, config: dict, launcher: Launcher) -> torch.Tensor:
    """One token per sequence (T == B, row b is sequence b; cu_seqlens_q is not read): the recurrent form."""
    _check(q, k, v, a, b, state, num_k_heads, num_v_heads, k_head_dim, v_head_dim)
    a, b = aligned(a), aligned(b)  # [T, Hv] columns of a merged projection: small, maybe at an odd offset
    num_tokens = q.shape[0]
    out = torch.empty(num_tokens, num_v_heads * v_head_dim, dtype=q.dtype, device=q.device)  # [B, Hv*Dv]
    if num_tokens == 0:
        return out
    cx = _constexprs(num_k_heads, num_v_heads, k_head_dim, v_head_dim, config)
    launcher.launch(_gdn_decode_kernel, (num_tokens, num_v_heads, cdiv(v_head_dim, cx["BLOCK_V"])),
                    (q, k, v, a, b, A_log, dt_bias, state, state_slots, seq_lens, out,
                     q.stride(0), k.stride(0), v.stride(0), a.stride(0), b.stride(0), out.stride(0),
                     float(k_head_dim ** -0.5)),
                    constexprs=cx, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def config_space(problem: dict) -> list[dict]:
    """Decode: BLOCK_V x num_warps. Prefill: also CHUNK, the kernels' block of tokens: the op's chunk_size
    (64, transformers' block) first; smaller blocks hold fewer registers and give the same result to float32
    rounding (the blocked form is exact algebra of the recurrence, as the decode form is)."""
    whole = max(16, next_power_of_2(problem["v_head_dim"]))
    if problem["phase"] == "decode":
        return [{"constexprs": {"BLOCK_V": bv}, "num_warps": w, "num_stages": 1}
                for bv in (32, 16, 64, 128) for w in (4, 1, 2, 8) if bv <= whole]
    chunks = [c for c in (problem.get("chunk_size", 64), 64, 32, 16) if c >= 16 and c == next_power_of_2(c)]
    return [{"constexprs": {"BLOCK_V": bv, "CHUNK": chunk}, "num_warps": w, "num_stages": 1}
            for chunk in dict.fromkeys(chunks) for bv in (16, 32, 64) if bv <= whole for w in (8, 4)]


def default_config(problem: dict) -> dict:
    return config_space(problem)[0]


# Below the kernels: an import above them would move their line numbers, which Triton's source hash
# and the binaries' line info include.
from rdnac.kernels.registry import KernelFamily, OpKernel, dtype_name  # noqa: E402


def _problem(a: dict, ins: list, phase: str, runtime: dict) -> dict:
    return {"phase": phase, "num_k_heads": a["num_k_heads"], "num_v_heads": a["num_v_heads"],
            "k_head_dim": a["k_head_dim"], "v_head_dim": a["v_head_dim"], "chunk_size": a.get("chunk_size", 64),
            "dtype": dtype_name(ins[0]), "num_seqs": ins[8].shape[0], "num_tokens": ins[0].shape[0]}


FAMILY = KernelFamily(
    "gated_delta", config_space=config_space, default_config=default_config,
    size=lambda p: p["num_seqs"] if p["phase"] == "decode" else p["num_tokens"],
    ops={"gated_delta_rule": OpKernel(gated_delta_rule_prefill, _problem, decode=gated_delta_rule_decode,
                                      takes_max_query_len=True)})
