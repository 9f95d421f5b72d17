"""Fuse the MLP's activation into the down projection that reads it (FP8, decode): one launch fewer per layer.

    m.fp8, m.fp8_scale = gated_act_quant(gate_up)                  (fuse_act_quant's output)
    out = linear_fp8(m.fp8, W, s_w, m.fp8_scale, [b])              (prequantized, group > 0)
        ==>   out = gated_act_linear_fp8(gate_up, W, s_w, [b])

At decode sizes the GEMM computes act(gate) * up and its FP8 groups in its own K loop (a group is one
BLOCK_K step), from the gate_up rows the gate/up GEMM wrote: the same bits as the pair, with no
activation launch between the two weight streams (`rdnac.kernels.gemm_fp8.gated_act_linear_fp8`; at
prefill sizes the node runs the pair). GPU targets only; runs after `fuse_act_quant`; fused only where the activation's
values are read by that one linear alone, grouped (per-token quantization needs the whole row's amax
before the first K step), from the merged gate_up form.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.compiler.passes.fuse_norm_quant import value_readers
from rdnac.ir.graph import Node

NAME = "fuse_act_linear"


def run(state: CompileState) -> None:
    if not state.target.is_gpu:  # the reference interpreter runs cpu plans: no launches to save
        return
    graph = state.graph
    readers = value_readers(graph)
    fused = set()
    for i, node in enumerate(graph.nodes):
        if node.op != "gated_act_quant":
            continue
        q, scale = node.outputs
        users = {r.name: r for r in readers.get(q, []) + readers.get(scale, [])}
        why = _why_not(graph, node, list(users.values()))
        if why:
            state.decide(NAME, node.name, "kept unfused", why)
            continue
        (linear,) = users.values()
        a = linear.attrs
        j = graph.nodes.index(linear)
        graph.nodes[j] = Node(linear.name, "gated_act_linear_fp8", [node.inputs[0], *linear.inputs[1:3],
                                                                    *linear.inputs[4:]], list(linear.outputs),
                              {"act": node.attrs["act"], "weight_scheme": a["weight_scheme"],
                               "fp8_format": a["fp8_format"], "group": a["group"], "block_size": a.get("block_size"),
                               "has_bias": a.get("has_bias", False), "out_dtype": a["out_dtype"]})
        fused.add(i)
        state.decide(NAME, linear.name, f"fused {node.name} ({node.attrs['act']} x up, {a['fp8_format']} "
                     f"group-{a['group']}) into the GEMM's A path",
                     "at decode sizes the GEMM quantizes act(gate) * up per K step from gate_up itself: one launch "
                     "fewer between the gate/up and down weight streams, the same bits as the pair")
    graph.nodes[:] = [n for i, n in enumerate(graph.nodes) if i not in fused]


def _why_not(graph, node: Node, users: list[Node]) -> str:
    if len(node.inputs) != 1:
        return "gate and up are separate tensors (the fused GEMM reads the merged gate_up rows)"
    if node.attrs["group"] == 0:
        return "per-token quantization: the row's amax is needed before the GEMM's first K step"
    if any(o in graph.outputs for o in node.outputs):
        return "its output is a graph output"
    if len(users) != 1 or users[0].op != "linear_fp8" or users[0].inputs[0] != node.outputs[0] \
            or users[0].inputs[3] != node.outputs[1] or users[0].attrs.get("act_scheme") != "prequantized":
        return f"read by {', '.join(f'{u.name} ({u.op})' for u in users)}, not by one prequantized linear_fp8"
    return ""
