"""Fuse an attention block's q/k norms, RoPE and KV-cache write into one `qk_norm_rope_cache` node.

    q1 = head_rms_norm(q, wq); k1 = head_rms_norm(k, wk)      (Qwen3-style models only)
    q2, k2 = rope(q1, k1, positions)
    kv_cache_write(k2, v, slot_mapping, k_cache, v_cache)
        ==>   q2 = qk_norm_rope_cache(q, k, v, positions, slot_mapping, k_cache, v_cache, [wq, wk])

Up to four launches that each read and write q and k become one; k' never
leaves the kernel except into the cache. The fused node keeps the rope's q'
output name, so attention and `rdnac verify` (which compares values by
name) see the same value. q and k may be strided split views of a merged
qkv output; the kernel takes rows with a stride.

Conditions: k' is read only by one kv_cache_write (and is no graph output);
nothing reads q' before that write (the fused node takes the write's place
in the node order). The norms are absorbed when both q and k have one whose
output only the rope reads, with the same eps and unit_offset; otherwise
they stay and only rope + cache write fuse (the reason is logged). Every
rope node gets a decision: fused, or kept separate and why.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.ir.graph import Graph, Node

NAME = "fuse_qk_norm_rope_cache"
OP = "qk_norm_rope_cache"


def run(state: CompileState) -> None:
    graph = state.graph
    nodes = graph.nodes
    producer = {out: i for i, n in enumerate(nodes) for out in n.outputs}
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.inputs:
            users.setdefault(name, []).append(i)
    names = {n.name for n in nodes}
    removed: set[int] = set()
    replaced: dict[int, Node] = {}
    for i, rope in enumerate(nodes):
        if rope.op != "rope":
            continue
        write_index, why_not = _cache_write(graph, rope, users)
        if why_not:
            state.decide(NAME, rope.name, "kept separate", why_not)
            continue
        write = nodes[write_index]
        norms, norm_note = _norms(graph, rope, i, producer, users)
        parent, _, _ = rope.name.rpartition(".")
        leaf = OP if norms else "rope_cache"  # layers.0.qk_norm_rope_cache (Qwen3), layers.0.rope_cache (Llama)
        name = f"{parent}.{leaf}" if parent else leaf
        if name in names:
            state.decide(NAME, rope.name, "kept separate", f"the fused node's name {name!r} is taken")
            continue
        names.add(name)
        q, k = rope.inputs[:2]
        attrs = {**rope.attrs, "qk_norm": bool(norms)}
        weights = []
        if norms:
            q_norm, k_norm = (nodes[j] for j in norms)
            q, k, weights = q_norm.inputs[0], k_norm.inputs[0], [q_norm.inputs[1], k_norm.inputs[1]]
            attrs.update(eps=q_norm.attrs["eps"], unit_offset=bool(q_norm.attrs.get("unit_offset", False)))
            removed.update(norms)
        inputs = [q, k, write.inputs[1], rope.inputs[2], *write.inputs[2:5], *weights]
        replaced[write_index] = Node(name, OP, inputs, [rope.outputs[0]], attrs)
        removed.add(i)
        parts = [nodes[j].name for j in norms] + [rope.name, write.name]
        state.decide(NAME, name, f"fused {', '.join(parts)} into one {OP}" + (f" ({norm_note})" if norm_note else ""),
                     f"one launch instead of {len(parts)}: q and k are read once, k' goes straight to the cache "
                     f"slot and is never written to memory in between")
    graph.nodes = [replaced.get(i, n) for i, n in enumerate(nodes) if i not in removed]


def _cache_write(graph: Graph, rope: Node, users: dict[str, list[int]]) -> tuple[int, str]:
    """The index of the kv_cache_write that is k''s only reader, or why there is none."""
    q_out, k_out = rope.outputs
    readers = users.get(k_out, [])
    if k_out in graph.outputs:
        return -1, f"k' ({k_out}) is a graph output"
    if len(readers) != 1:
        return -1, f"k' ({k_out}) is read by {len(readers)} nodes; fusing needs exactly one kv_cache_write"
    write = graph.nodes[readers[0]]
    if write.op != "kv_cache_write" or write.inputs[0] != k_out or k_out in write.inputs[1:]:
        return -1, f"k' ({k_out}) is read by {write.name} ({write.op}), not as the key of a kv_cache_write"
    a = rope.attrs
    if (write.attrs["num_kv_heads"], write.attrs["head_dim"]) != (a["num_kv_heads"], a["head_dim"]):
        return -1, f"{write.name} writes heads {write.attrs['num_kv_heads']}x{write.attrs['head_dim']}, rope has " \
                   f"{a['num_kv_heads']}x{a['head_dim']}"
    early = [graph.nodes[u].name for u in users.get(q_out, []) if u < readers[0]]
    if early:
        return -1, f"q' ({q_out}) is read by {', '.join(early)} before the cache write {write.name}"
    return readers[0], ""


def _norms(graph: Graph, rope: Node, index: int, producer: dict[str, int],
           users: dict[str, list[int]]) -> tuple[list[int], str]:
    """Indices of the q and k head_rms_norms to absorb ([] if none), and a note when some are kept."""
    found = [producer.get(x) for x in rope.inputs[:2]]
    is_norm = [j is not None and graph.nodes[j].op == "head_rms_norm" for j in found]
    if not any(is_norm):
        return [], ""
    if not all(is_norm):
        return [], f"{'q' if is_norm[0] else 'k'} alone has a head_rms_norm: norms kept separate"
    q_norm, k_norm = (graph.nodes[j] for j in found)
    for norm in (q_norm, k_norm):
        if users.get(norm.outputs[0]) != [index] or norm.outputs[0] in graph.outputs:
            return [], f"{norm.name}'s output is read by more than the rope: norms kept separate"
    keys = ("eps", "unit_offset")
    if any(q_norm.attrs.get(key, False) != k_norm.attrs.get(key, False) for key in keys):
        return [], f"{q_norm.name} and {k_norm.name} differ in eps or unit_offset: norms kept separate"
    a = rope.attrs
    if (q_norm.attrs["num_heads"], k_norm.attrs["num_heads"]) != (a["num_heads"], a["num_kv_heads"]) or \
            q_norm.attrs["head_dim"] != a["head_dim"] or k_norm.attrs["head_dim"] != a["head_dim"]:
        return [], "the norms' heads do not match the rope's: norms kept separate"
    w_q, w_k = (graph.weights.get(n.inputs[1]) for n in (q_norm, k_norm))
    if w_q is None or w_k is None or w_q.dtype != w_k.dtype:
        return [], "the q and k norm weights are not weights of one dtype: norms kept separate"
    return [found[0], found[1]], ""
