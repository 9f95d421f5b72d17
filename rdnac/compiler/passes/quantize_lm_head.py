"""`--fp8-lm-head`: the logits projection as an FP8 GEMM (per-channel weight, per-token activations).

    logits(x, idx, W)   ==>   g = embedding(idx, x); logits = linear_fp8(g, bits(W), scale(W), float32 out)

The rows are gathered first (the embedding kernel is a row gather), so only the R rows that need
logits are quantized and multiplied. A weight tied to the embedding gets an FP8 copy (the
embedding keeps reading the original). Softcapped logits are kept (the FP8 GEMM has no softcap).
Runs right after `quantize`.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.compiler.passes.quantize import NAME, quantize_weight  # logged as the quantize pass's decisions
from rdnac.ir.fp8 import dequantize_weight
from rdnac.ir.graph import Node, WeightSpec


def run(state: CompileState) -> None:
    if not state.options.fp8_lm_head:
        return
    graph, weights = state.graph, state.weights
    for i, node in enumerate(graph.nodes):
        if node.op != "logits":
            continue
        if node.attrs.get("softcap", 0.0):
            state.decide(NAME, node.name, "kept the lm_head in the compute dtype", "--fp8-lm-head: the logits are "
                         "softcapped, which the FP8 GEMM does not apply")
            continue
        x, idx, wname = node.inputs
        tied = any(wname in n.inputs for n in graph.nodes if n is not node)
        w = weights[wname]
        bits, scale = quantize_weight(w, "channel")
        qname = f"{wname}.fp8" if tied else wname
        sname = wname.removesuffix(".weight") + ".weight_scale"
        rel_err = ((dequantize_weight(bits, scale, "channel") - w.float()).norm() / w.float().norm()).item()
        source = graph.weights[wname].source or wname
        weights[qname], weights[sname] = bits, scale
        graph.weights[qname] = WeightSpec("float8_e4m3fn", tuple(bits.shape), "fp8-channel", source=source)
        graph.weights[sname] = WeightSpec("float32", tuple(scale.shape), "fp8-scale", source=f"quantize({source})")
        rows = f"{node.name}.rows"
        gather = Node(rows, "embedding", [idx, x], [rows], {})
        graph.nodes[i] = Node(node.name, "linear_fp8", [rows, qname, sname], list(node.outputs),
                              {"weight_scheme": "channel", "act_scheme": "dynamic_token", "fp8_format": "e4m3fn",
                               "block_size": None, "has_bias": False, "out_dtype": "float32"})
        graph.nodes.insert(i, gather)
        state.decide(NAME, node.name, f"lm_head {wname} to fp8-channel (float32 logits), rows gathered first",
                     f"--fp8-lm-head: halves the largest single weight read per decode step; weight relative "
                     f"error {rel_err:.2%}" + (f"; tied to the embedding, so an FP8 copy {qname} is added "
                                               f"({bits.numel() / 1e6:.0f} MB)" if tied else ""))
        break
