"""Fuse a residual `add` into the `rms_norm` that reads its sum.

    h = add(a, b); y = rms_norm(h, w)   ==>   y, h = rms_norm(b, a, w)

The fused norm produces both the normalized value and the sum, under the
add's old output name, so later users of the sum are unchanged.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.ir.graph import Node

NAME = "fuse_add_rms_norm"


def run(state: CompileState) -> None:
    graph = state.graph
    producer = {out: i for i, n in enumerate(graph.nodes) for out in n.outputs}
    users: dict[str, list[int]] = {}
    for i, n in enumerate(graph.nodes):
        for name in n.inputs:
            users.setdefault(name, []).append(i)
    removed: set[int] = set()
    replaced: dict[int, Node] = {}
    for i, norm in enumerate(graph.nodes):
        if norm.op != "rms_norm" or len(norm.inputs) != 2:
            continue
        src = producer.get(norm.inputs[0])
        if src is None or graph.nodes[src].op != "add":
            continue
        add = graph.nodes[src]
        total = add.outputs[0]
        if any(u < i for u in users[total] if u != src and u != i):
            continue  # something reads the sum before the norm: keep the add where it is
        a, b = add.inputs
        replaced[i] = Node(norm.name, "rms_norm", [b, a, norm.inputs[1]], [norm.outputs[0], total], dict(norm.attrs))
        removed.add(src)
        state.decide(NAME, norm.name, f"fused {add.name} into the norm", "one pass over the hidden state "
                     "instead of two (add writes, norm reads)")
    graph.nodes = [replaced.get(i, n) for i, n in enumerate(graph.nodes) if i not in removed]
