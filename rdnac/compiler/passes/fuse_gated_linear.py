"""Fuse the MLP's gated activation into the merged gate/up GEMM that feeds it.

    gu = linear(x, W [2I, K], [b]); m = gated_act(gu, act)
        ==>   m = linear_gated_act(x, W, [b], act)

The GEMM computes each output column's gate and up sums in one program and
writes m [T, I] (see `rdnac.kernels.gemm_gated`): the [T, 2I] gate_up
tensor is never written or read back and the activation launch goes. The
values are the same bit for bit (the op is defined as that chain, and the
kernel rounds where the unfused kernels do).

Fused only when the gated_act reads the linear's output in its one-input
(merged) form and is its only reader, and the linear is a plain `linear`
(bf16/fp16/fp32: an FP8 `linear_fp8` keeps its own kernels). It runs after
`fuse_act_quant`, so a gated_act whose FP8 quantization was fused into it
(now `gated_act_quant`) is left as it is. The fused node takes the linear's
name and the gated_act's output, so later readers are unchanged.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.compiler.passes.fuse_norm_quant import value_readers
from rdnac.ir.graph import Graph, Node

NAME = "fuse_gated_linear"


def run(state: CompileState) -> None:
    graph = state.graph
    producers = {o: n for n in graph.nodes for o in n.outputs}
    readers = value_readers(graph)
    replace: dict[str, Node] = {}  # gated_act name -> fused node (emitted where the gated_act was)
    removed: set[str] = set()
    for act in graph.nodes:
        if act.op != "gated_act":
            continue
        if len(act.inputs) != 1:
            state.decide(NAME, act.name, "kept unfused", "it reads gate and up as two values, not one merged "
                         "gate_up GEMM's output (merge_linears did not merge them)")
            continue
        gate_up = act.inputs[0]
        linear = producers.get(gate_up)
        why_not = _why_not(graph, act, linear, readers)
        if why_not:
            state.decide(NAME, act.name, "kept unfused", why_not)
            continue
        fused = Node(linear.name, "linear_gated_act", list(linear.inputs), list(act.outputs), {"act": act.attrs["act"]})
        replace[act.name] = fused
        removed.add(linear.name)
        width = graph.weights[linear.inputs[1]].shape
        state.decide(NAME, fused.name, f"fused gated_act {act.name} ({act.attrs['act']}) into the GEMM "
                     f"[{width[0]}, {width[1]}]{' with bias' if len(linear.inputs) == 3 else ''}",
                     f"the GEMM writes {act.outputs[0]} [T, {width[0] // 2}] from its gate and up sums: "
                     f"no [T, {width[0]}] {gate_up} round trip and one launch fewer; the same bits as the unfused pair")
    # The fused node sits where the gated_act was: after every node the linear's inputs need.
    graph.nodes = [replace.get(n.name, n) for n in graph.nodes if n.name not in removed]


def _why_not(graph: Graph, act: Node, linear: Node | None, readers: dict[str, list[Node]]) -> str:
    """Why `act` cannot fuse into `linear`, the producer of its one input ("" when it can)."""
    gate_up = act.inputs[0]
    if linear is None:
        return f"{gate_up} is not produced by a node"
    if linear.op != "linear":
        return f"{gate_up} comes from {linear.name} ({linear.op}), not a plain linear"
    if len(linear.outputs) != 1:
        return f"{linear.name} has several outputs"
    others = {r.name: r.op for r in readers.get(gate_up, []) if r is not act}
    if others:
        return f"{gate_up} is also read by {', '.join(f'{name} ({op})' for name, op in others.items())}"
    if gate_up in graph.outputs:
        return f"{gate_up} is a graph output"
    weight = graph.weights.get(linear.inputs[1])
    if weight is None or len(weight.shape) != 2 or weight.shape[0] % 2:
        return f"{linear.inputs[1]} is not a [2I, K] weight"
    return ""
