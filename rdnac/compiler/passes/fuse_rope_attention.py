"""Fuse a `qk_norm_rope_cache` into the attention that reads its q': one `rope_cache_attention` node.

    q2 = qk_norm_rope_cache(q, k, v, positions, slot_mapping, k_cache, v_cache, [wq, wk])
    o = attention(q2, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, positions, [sinks])
        ==>   o = rope_cache_attention(q, k, v, positions, slot_mapping, k_cache, v_cache, block_tables,
                                       seq_lens, cu_seqlens_q, [wq, wk], [sinks])

Runs after fuse_qk_norm_rope_cache, so it sees Qwen3's qk_norm form and
Llama's rope-only form (qk_norm False) alike. At decode the fused node is
one launch whose KV loads start before the PDL wait (see
`rdnac/kernels/attention_rope.py`); prefill keeps the two launches.

Conditions: q' is read only by that attention (as its q, and is no graph
output); the attention reads the caches the rope node writes and the same
positions, with the same heads; no node between the two touches those
caches (the fused node takes the attention's place and writes them there).
The fused node keeps the attention's output name. Every qk_norm_rope_cache
gets a decision: fused, or kept separate and why.
"""

from __future__ import annotations

from rdnac.compiler.passes import PassContext
from rdnac.ir.graph import Graph, Node

NAME = "fuse_rope_attention"
OP = "rope_cache_attention"


def run(graph: Graph, ctx: PassContext) -> Graph:
    nodes = graph.nodes
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.inputs:
            users.setdefault(name, []).append(i)
    names = {n.name for n in nodes}
    removed: set[int] = set()
    replaced: dict[int, Node] = {}
    for i, rope in enumerate(nodes):
        if rope.op != "qk_norm_rope_cache":
            continue
        attn_index, why_not = _attention(graph, rope, i, users)
        if why_not:
            ctx.decide(NAME, rope.name, "kept separate", why_not)
            continue
        attn = nodes[attn_index]
        parent, _, _ = attn.name.rpartition(".")
        name = f"{parent}.{OP}" if parent else OP
        if name in names:
            ctx.decide(NAME, rope.name, "kept separate", f"the fused node's name {name!r} is taken")
            continue
        names.add(name)
        q, k, v, positions, slot_mapping, k_cache, v_cache, *norms = rope.inputs
        block_tables, seq_lens, cu_seqlens_q, _, *sinks = attn.inputs[3:]
        inputs = [q, k, v, positions, slot_mapping, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                  *norms, *sinks]
        attrs = {**rope.attrs, **attn.attrs}
        replaced[attn_index] = Node(name, OP, inputs, list(attn.outputs), attrs)
        removed.add(i)
        ctx.decide(NAME, name, f"fused {rope.name} ({'q/k norm, ' if rope.attrs['qk_norm'] else ''}RoPE, cache "
                               f"write) and {attn.name} into one {OP}",
                   "decode: one launch whose block-table and first K/V tile loads are issued before the PDL wait "
                   "(they do not depend on the qkv GEMM), q' never goes to memory; prefill: the same two launches")
    graph.nodes = [replaced.get(i, n) for i, n in enumerate(nodes) if i not in removed]
    return graph


def _attention(graph: Graph, rope: Node, index: int, users: dict[str, list[int]]) -> tuple[int, str]:
    """The index of the attention node that is q''s only reader, or why there is none."""
    (q_out,) = rope.outputs
    readers = users.get(q_out, [])
    if q_out in graph.outputs:
        return -1, f"q' ({q_out}) is a graph output"
    if len(readers) != 1:
        return -1, f"q' ({q_out}) is read by {len(readers)} nodes; fusing needs exactly one attention"
    attn = graph.nodes[readers[0]]
    if attn.op != "attention" or attn.inputs[0] != q_out or q_out in attn.inputs[1:]:
        return -1, f"q' ({q_out}) is read by {attn.name} ({attn.op}), not as the query of an attention"
    k_cache, v_cache = rope.inputs[5:7]
    if attn.inputs[1:3] != [k_cache, v_cache]:
        return -1, f"{attn.name} reads caches {attn.inputs[1:3]}, not the ones {rope.name} writes"
    if attn.inputs[6] != rope.inputs[3]:
        return -1, f"{attn.name} reads positions {attn.inputs[6]!r}, {rope.name} {rope.inputs[3]!r}"
    heads = ("num_heads", "num_kv_heads", "head_dim")
    if any(attn.attrs[h] != rope.attrs[h] for h in heads):
        return -1, f"{attn.name} and {rope.name} differ in heads ({', '.join(heads)})"
    between = [n.name for n in graph.nodes[index + 1:readers[0]] if {k_cache, v_cache} & set(n.inputs)]
    if between:
        return -1, f"{', '.join(between)} use the caches between {rope.name} and {attn.name}"
    return readers[0], ""
