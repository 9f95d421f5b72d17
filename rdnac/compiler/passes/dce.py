"""Dead-code elimination: drop nodes whose outputs nothing reads, and unused weights."""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.ir.ops import OPS

NAME = "dce"


def run(state: CompileState) -> None:
    graph = state.graph
    live = set(graph.outputs)
    kept = []
    for node in reversed(graph.nodes):
        if OPS[node.op].has_side_effects or any(o in live for o in node.outputs):
            kept.append(node)
            live.update(node.inputs)
        else:
            state.decide(NAME, node.name, "removed", "no output is used")
    graph.nodes = kept[::-1]
    for name in [w for w in graph.weights if w not in live]:
        del graph.weights[name]
        state.decide(NAME, name, "removed weight", "no node reads it")
