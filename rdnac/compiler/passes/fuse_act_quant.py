"""Fuse the FP8 activation quantization of `linear_fp8` readers into the `gated_act` that feeds them.

    m = gated_act(gate_up); out = linear_fp8(m, W, s_w, [b])   (act_scheme dynamic_*)
        ==>   m.fp8, m.fp8_scale = gated_act_quant(gate_up)
              out = linear_fp8(m.fp8, W, s_w, m.fp8_scale, [b])   (act_scheme "prequantized")

The MLP's down projection then reads fp8 values written by the activation
kernel instead of quantizing a bf16 [T, I] tensor in a launch of its own;
the values are the same bit for bit (see `rdnac.kernels.activation_quant`).
The conditions and the reader rewrite are `fuse_norm_quant`'s: every reader
a dynamically quantizing `linear_fp8` with one format and group.
"""

from __future__ import annotations

from rdnac.compiler.passes import PassContext
from rdnac.compiler.passes.fuse_norm_quant import (prequantize_readers, quant_label, shared_quant, value_readers,
                                                   value_specs)
from rdnac.ir.graph import Graph, Node

NAME = "fuse_act_quant"


def run(graph: Graph, ctx: PassContext) -> Graph:
    readers = value_readers(graph)
    specs = value_specs(graph)
    for i, act in enumerate(graph.nodes):
        if act.op != "gated_act":
            continue
        m = act.outputs[0]
        quant, why_not = shared_quant(graph, m, readers.get(m, []))
        if quant is None:
            if why_not:
                ctx.decide(NAME, act.name, "kept unfused", why_not)
            continue
        fmt, group = quant
        q, scale = prequantize_readers(graph, m, readers[m], fmt, group, specs[m].dtype)
        graph.nodes[i] = Node(act.name, "gated_act_quant", list(act.inputs), [q, scale],
                              {**act.attrs, "fp8_format": fmt, "group": group})
        ctx.decide(NAME, act.name, f"fused {quant_label(fmt, group)} quantization of "
                   f"{', '.join(r.name for r in readers[m])} into the activation",
                   f"the activation writes fp8 {q} and scales {scale}, which the linear reads as they are: "
                   "one launch fewer and no bf16 round trip; the same bits as quantizing in the linear")
    return graph
