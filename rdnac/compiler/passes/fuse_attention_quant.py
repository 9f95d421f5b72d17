"""Fuse o_proj's FP8 activation quantization into the `attention` that feeds it.

    a = attention(q, caches, ...); out = linear_fp8(a, W, s_w, [b])   (act_scheme dynamic_group)
        ==>   a.fp8, a.fp8_scale = attention_quant(q, caches, ...)
              out = linear_fp8(a.fp8, W, s_w, a.fp8_scale, [b])       (act_scheme "prequantized")

At decode the attention kernel writes the fp8 values and their scales from the
registers that hold each head's output (`rdnac.kernels.attention`), so o_proj's
quantization launch goes; prefill runs attention and then that quantization.
The bits are the unfused pair's. Only where a quantization group is exactly one
head (group == head_dim, e.g. 128 for block-128 FP8 checkpoints at head_dim
128): a program holds whole heads, never a whole token's row, so per-token
scales and groups spanning heads stay with the linear, the reason logged.
The reader conditions and rewrite are `fuse_norm_quant`'s.
"""

from __future__ import annotations

from rdnac.compiler.passes import PassContext
from rdnac.compiler.passes.fuse_norm_quant import (prequantize_readers, quant_label, shared_quant, value_readers,
                                                   value_specs)
from rdnac.ir.graph import Graph, Node

NAME = "fuse_attention_quant"


def run(graph: Graph, ctx: PassContext) -> Graph:
    readers = value_readers(graph)
    specs = value_specs(graph)
    for i, node in enumerate(graph.nodes):
        if node.op != "attention":
            continue
        out = node.outputs[0]
        quant, why_not = shared_quant(graph, out, readers.get(out, []))
        if quant is not None and quant[1] != node.attrs["head_dim"]:
            why_not = (f"the attention kernel quantizes whole heads: {quant_label(*quant)} is not one head of "
                       f"{node.attrs['head_dim']}")
            quant = None
        if quant is None:
            if why_not:
                ctx.decide(NAME, node.name, "kept unfused", why_not)
            continue
        fmt, group = quant
        q, scale = prequantize_readers(graph, out, readers[out], fmt, group, specs[out].dtype)
        graph.nodes[i] = Node(node.name, "attention_quant", list(node.inputs), [q, scale],
                              {**node.attrs, "fp8_format": fmt, "group": group})
        ctx.decide(NAME, node.name, f"fused {quant_label(fmt, group)} quantization of "
                   f"{', '.join(r.name for r in readers[out])} into the attention",
                   f"decode attention writes fp8 {q} and per-head scales {scale} from its output registers: "
                   "one launch fewer per layer and no bf16 round trip; the same bits as quantizing in the linear")
    return graph
