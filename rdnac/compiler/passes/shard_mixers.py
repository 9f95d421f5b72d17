"""Sharding the token mixers that are not plain attention: MLA (DeepSeek V2/V3) and Gated DeltaNet (Qwen3.5,
Qwen3-Next), by head, for the shard pass (shard.py, whose `Sharder` calls these).

- MLA (`mla_attention`): the query heads split over the ranks, H/N each:
  q_b_proj (or q_proj) column-parallel by head (each head's Dn + Dr rows);
  kv_b_proj's rows and the absorbed form's w_uk / w_uv by head; o_proj
  row-parallel + all_reduce. The latent cache holds one latent per token
  that every head reads, so it stays whole on every rank, and so do what
  writes it (kv_a_proj_with_mqa, kv_a_layernorm, mla_cache_write) and the
  q LoRA's down projection and norm: every rank computes them, and each reads
  the latents with its own heads. A q_proj merged with kv_a_proj_with_mqa
  (merge_linears) keeps its kv_a rows whole beside the rank's q rows.
- GDN (`gated_delta_rule`): the key heads split over the ranks, Hk/N each,
  with the Hv/Hk value heads each serves (consecutive, so a rank's value heads
  are a block too): the q/k/v channels through the causal conv (its weight
  rows and conv state), z, the a/b gates, A_log and dt_bias by value head;
  the recurrent state holds the rank's value heads only; the gated norm runs
  per head (its weight [D] is the same for every head); out_proj
  row-parallel + all_reduce.
"""

from __future__ import annotations

from rdnac.ir.graph import Node


def mla(s, node: Node) -> None:
    a, n = node.attrs, s.n
    heads, dn, dr, dv = a["num_heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
    if heads % n:
        s.fail(node, f"has {heads} query heads; --tp must divide them (each rank attends with whole heads over "
                     f"the latent cache every rank holds); choose a --tp that divides {heads}")
    local = heads // n
    mine = lambda r: range(r * local, (r + 1) * local)  # noqa: E731
    q, chain = s.trace(node.inputs[0], node)
    assert not chain, chain
    s.want_columns(q, s.head_columns(mine, dn + dr), "column-parallel by MLA query head", node)
    s.rows(node.inputs[6], "by MLA head: its Dn key and Dv value rows", s.head_columns(mine, dn + dv))
    for w in node.inputs[7:9]:  # w_uk [H, R, Dn], w_uv [H, Dv, R] of the absorbed form
        s.shard(w, "by MLA head", lambda t, r: t[r * local:(r + 1) * local])
    a["num_heads"] = local
    o_proj = s.single_linear_reader(node.outputs[0], node)
    s.row_parallel(o_proj, lambda r: slice(r * local * dv, (r + 1) * local * dv))
    s.state.decide("shard", node.name, f"{local} of {heads} MLA heads per rank (q and kv_b rows by head); "
                   f"latent cache whole on every rank; {o_proj.name} row-parallel + all_reduce",
                   "the latent is shared by all heads: each rank keeps it and reads it with its own heads")


def gated_delta_rule(s, node: Node) -> None:
    a, n = node.attrs, s.n
    hk, hv, dk, dv = a["num_k_heads"], a["num_v_heads"], a["k_head_dim"], a["v_head_dim"]
    if hk % n:
        s.fail(node, f"has {hk} key heads (each serving {hv // hk} value heads); --tp must divide the key heads "
                     "(each rank keeps whole key heads with the value heads they serve, their conv channels and "
                     f"recurrent state); choose a --tp that divides {hk}")
    hk_l, hv_l = hk // n, hv // n
    k_heads = lambda r: range(r * hk_l, (r + 1) * hk_l)  # noqa: E731
    v_heads = lambda r: range(r * hv_l, (r + 1) * hv_l)  # noqa: E731
    q, k, v, alpha, beta = node.inputs[:5]
    for value, cols, what in ((q, s.head_columns(k_heads, dk), "key head"), (k, s.head_columns(k_heads, dk),
                              "key head"), (v, s.head_columns(v_heads, dv), "value head"),
                              (alpha, s.head_columns(v_heads, 1), "value head"),
                              (beta, s.head_columns(v_heads, 1), "value head")):
        s.want_columns(value, cols, f"column-parallel by GDN {what}", node)
    for w in node.inputs[5:7]:  # A_log, dt_bias [Hv]
        s.rows(w, "by GDN value head", lambda r: list(v_heads(r)))
    s.local_state(node.inputs[7], (hv_l, dk, dv))
    a.update(num_k_heads=hk_l, num_v_heads=hv_l)
    out = node.outputs[0]
    norm = s.readers.get(out, [])
    if len(norm) != 1 or norm[0].op not in ("gated_rms_norm", "gated_rms_norm_quant") or norm[0].inputs[0] != out:
        s.fail(node, f"requires its output to feed one gated_rms_norm; it feeds "
                     f"{[f'{r.name} ({r.op})' for r in norm]}")
    norm = norm[0]
    s.want_columns(norm.inputs[1], s.head_columns(v_heads, dv), "column-parallel by GDN value head (gate z)", node)
    norm.attrs["num_heads"] = hv_l
    out_proj = s.single_linear_reader(norm.outputs[0], norm)
    s.row_parallel(out_proj, lambda r: slice(r * hv_l * dv, (r + 1) * hv_l * dv))
    s.state.decide("shard", node.name, f"{hk_l} of {hk} key heads and {hv_l} of {hv} value heads per rank, with "
                   f"their conv channels and recurrent state; {out_proj.name} row-parallel + all_reduce",
                   "a head's recurrence reads only its own channels; the gated norm is per head")
