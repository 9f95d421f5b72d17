"""Multi-head latent attention (MLA, DeepSeek V2/V3): references, shape rules and checks.

| op              | inputs                                                              | outputs       |
|-----------------|---------------------------------------------------------------------|---------------|
| mla_cache_write | latent [T, R], k_pe [T, Dr], positions [T], slot_mapping [T],       | (latent_cache)|
|                 | latent_cache [NB, BS, R+Dr]                                         |               |
| mla_attention   | q [T, H*(Dn+Dr)], latent_cache, block_tables [B, MB], seq_lens [B], | [T, H*Dv]     |
|                 | cu_seqlens_q [B+1], positions [T], kv_b [H*(Dn+Dv), R],             |               |
|                 | (w_uk [H, R, Dn], w_uv [H, Dv, R]: the absorbed form's weights)     |               |

R = kv_lora_rank, Dn = qk_nope_head_dim, Dr = qk_rope_head_dim, Dv = v_head_dim.

The layer's whole key/value state is one latent per token: the normalized
compressed kv (`kv_a_layernorm(kv_a_proj_with_mqa(x)[:, :R])`, R wide) and
the one rotated key head shared by all heads (Dr wide), stored side by side
in a `paged_latent` cache entry of R + Dr (ir/state.py), addressed like
paged_kv through slot_mapping / block_tables. `mla_cache_write` rotates
k_pe (RoPE at `positions`, attrs theta, scaling, style as the `rope` op's;
DeepSeek's interleaved layout is style "gptj") and writes [latent, k_pe']
to each token's slot; slots < 0 (padding) are skipped.

`mla_attention` rotates the last Dr of each query head the same way and
attends causally (as `attention`: query i sees cache positions j <=
positions[i], j < seq_lens[b]) with softmax scale `scale`. Two forms compute
the same function:

- "expanded": kv_b expands every cached latent to per-head keys and values,
  [k_nope, v] = latent @ kv_b^T (rows per head: Dn key rows, then Dv value
  rows), in the cache's dtype as transformers' kv_b_proj; keys are [k_nope,
  k_pe'] per head. Prefill's form: the expansion is amortized over the
  chunk's queries.
- "absorbed": W_UK is folded into the query (q_lat = q_nope @ W_UK, R wide
  per head), scores are q_lat . latent + q_pe' . k_pe', the probabilities
  weight the latents themselves, and W_UV maps the result back to Dv per
  head. Decode's form: it reads R + Dr per cached token instead of
  H * (Dn + Dr + Dv). w_uk [H, R, Dn] and w_uv [H, Dv, R] are kv_b's key and
  value rows per head (weights [N, K] per head like `linear`'s).

Attr `prefill_form` (default "expanded") is used for a chunk that starts a
sequence or has more than one query; `decode_form` (default "expanded")
for a chunk of one query token continuing its sequence. A compiler pass
(passes/mla_forms.py) chooses them and adds w_uk / w_uv. Scores and
softmax are float32; the output is cast to q's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rdnac.ir.graph import TensorSpec
from rdnac.ir.rope_math import rope_cos_sin, rotate

FORMS = ("expanded", "absorbed")
OP_NAMES = ("mla_cache_write", "mla_attention")


def mla_cache_write(latent: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                    latent_cache: torch.Tensor, *, kv_lora_rank: int, qk_rope_head_dim: int, theta: float,
                    scaling: dict | None = None, style: str = "gptj") -> None:
    num_tokens, rope_dim = k_pe.shape[0], qk_rope_head_dim
    cos, sin = rope_cos_sin(positions, rope_dim, theta, scaling)
    k_pe = rotate(k_pe.reshape(num_tokens, 1, rope_dim), cos, sin, rope_dim, style).reshape(num_tokens, rope_dim)
    block_size = latent_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    entry = torch.cat([latent[keep].to(latent_cache.dtype), k_pe[keep].to(latent_cache.dtype)], dim=-1)
    latent_cache[slots // block_size, slots % block_size] = entry


def _chunks(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor):
    """(first query, end query, context length, whether it is a decode chunk) of every non-empty chunk."""
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, ctx in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        if end > start:
            yield b, start, end, ctx, end - start == 1 and ctx > 1


def mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, positions: torch.Tensor, kv_b: torch.Tensor,
                  w_uk: torch.Tensor | None = None, w_uv: torch.Tensor | None = None, *, num_heads: int,
                  qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, kv_lora_rank: int, scale: float,
                  theta: float, scaling: dict | None = None, style: str = "gptj", prefill_form: str = "expanded",
                  decode_form: str = "expanded") -> torch.Tensor:
    num_tokens, heads, dn, dr, dv, rank = q.shape[0], num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, \
        kv_lora_rank
    q = q.reshape(num_tokens, heads, dn + dr)
    cos, sin = rope_cos_sin(positions, dr, theta, scaling)
    q_nope, q_pe = q[..., :dn], rotate(q[..., dn:], cos, sin, dr, style)  # [T, H, Dn], [T, H, Dr]
    block_size = latent_cache.shape[1]
    flat = latent_cache.reshape(-1, rank + dr)
    out = torch.empty(num_tokens, heads, dv, dtype=q.dtype, device=q.device)
    for b, start, end, ctx, is_decode in _chunks(seq_lens, cu_seqlens_q):
        j = torch.arange(ctx, device=q.device)
        entries = flat[block_tables[b, j // block_size].long() * block_size + j % block_size]  # [S, R+Dr]
        latent, k_pe = entries[:, :rank], entries[:, rank:]
        allowed = j[None, :] <= positions[start:end].long()[:, None]  # [Tq, S]
        form = decode_form if is_decode else prefill_form
        if form == "expanded":
            kv = F.linear(latent, kv_b).reshape(ctx, heads, dn + dv)  # [S, H, Dn+Dv]
            keys = torch.cat([kv[..., :dn], k_pe[:, None, :].expand(ctx, heads, dr)], -1).float()
            queries = torch.cat([q_nope[start:end], q_pe[start:end]], -1).float()  # [Tq, H, Dn+Dr]
            scores = torch.einsum("thd,shd->hts", queries, keys) * scale
            probs = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), -1)
            out[start:end] = torch.einsum("hts,shd->thd", probs, kv[..., dn:].float()).to(q.dtype)
        else:
            assert form == "absorbed" and w_uk is not None and w_uv is not None, form
            q_latent = torch.einsum("thn,hrn->thr", q_nope[start:end].float(), w_uk.float())  # [Tq, H, R]
            scores = (torch.einsum("thr,sr->hts", q_latent, latent.float())
                      + torch.einsum("thd,sd->hts", q_pe[start:end].float(), k_pe.float())) * scale
            probs = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), -1)
            o_latent = torch.einsum("hts,sr->thr", probs, latent.float())  # [Tq, H, R]
            out[start:end] = torch.einsum("thr,hvr->thv", o_latent, w_uv.float()).to(q.dtype)
    return out.reshape(num_tokens, heads * dv)


def absorbed_weights(kv_b: torch.Tensor, num_heads: int, qk_nope_head_dim: int,
                     v_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_uk [H, R, Dn], w_uv [H, Dv, R]) of kv_b [H*(Dn+Dv), R]: its key and value rows per head."""
    per_head = kv_b.reshape(num_heads, qk_nope_head_dim + v_head_dim, -1)
    return per_head[:, :qk_nope_head_dim].transpose(1, 2).contiguous(), per_head[:, qk_nope_head_dim:].contiguous()


# ---------------------------------------------------------------- shape rules and checks


def mla_attention_infer(attrs: dict, ins: list[TensorSpec]) -> list[TensorSpec]:
    return [TensorSpec(ins[0].dtype, (ins[0].shape[0], attrs["num_heads"] * attrs["v_head_dim"]))]


def check(op: str, a: dict, ins: list[TensorSpec], expect, written_caches: set[str], names: list[str]) -> None:
    """verify's checks of one MLA node: `expect(condition, what)` fails naming the node."""
    rank, dr = a["kv_lora_rank"], a["qk_rope_head_dim"]
    expect(dr % 2 == 0 and dr > 0, "qk_rope_head_dim must be even and positive")
    expect(a.get("style", "gptj") in ("neox", "gptj"), "style must be neox or gptj")
    if op == "mla_cache_write":
        expect(ins[0].shape[-1] == rank, "latent must be [T, kv_lora_rank]")
        expect(ins[1].shape[-1] == dr, "k_pe must be [T, qk_rope_head_dim]")
        expect(tuple(ins[4].shape[2:]) == (rank + dr,), "latent_cache must be [NB, BS, kv_lora_rank+qk_rope_head_dim]")
        return
    heads, dn, dv = a["num_heads"], a["qk_nope_head_dim"], a["v_head_dim"]
    expect(ins[0].shape[-1] == heads * (dn + dr), "q must be [T, num_heads*(qk_nope_head_dim+qk_rope_head_dim)]")
    expect(tuple(ins[1].shape[2:]) == (rank + dr,), "latent_cache must be [NB, BS, kv_lora_rank+qk_rope_head_dim]")
    expect(names[1] in written_caches, f"reads latent cache {names[1]!r} before any mla_cache_write to it")
    expect(tuple(ins[6].shape) == (heads * (dn + dv), rank), "kv_b must be [num_heads*(qk_nope+v_head_dim), "
                                                             "kv_lora_rank]")
    forms = (a.get("prefill_form", "expanded"), a.get("decode_form", "expanded"))
    expect(all(f in FORMS for f in forms), f"prefill_form and decode_form must be in {FORMS}; got {forms}")
    if "absorbed" in forms:
        expect(len(ins) == 9, "the absorbed form requires inputs w_uk and w_uv")
    if len(ins) == 9:
        expect(tuple(ins[7].shape) == (heads, rank, dn), "w_uk must be [num_heads, kv_lora_rank, qk_nope_head_dim]")
        expect(tuple(ins[8].shape) == (heads, dv, rank), "w_uv must be [num_heads, v_head_dim, kv_lora_rank]")
