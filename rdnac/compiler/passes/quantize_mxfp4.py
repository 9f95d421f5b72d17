"""Compile-time MXFP4 of a float MoE checkpoint's experts (`--quantize mxfp4`).

    y = moe_experts(x, w, ids, W13, W2, b13, b2)
        ==>   y = moe_experts_mxfp4(x, w, ids, blocks(W13), scales(W13), blocks(W2), scales(W2), b13, b2)

Each expert weight row (w13 [E, 2I, H], w2 [E, H, I]: [N, K] rows) is
quantized along K by `rdnac.ir.mxfp4.quantize` (e2m1 pairs, one e8m0 scale
per 32, the smallest scale that does not saturate). Only the experts change:
attention, router, embedding and logits keep the compute dtype. Each layer's
relative error is recorded. Runs first, beside `quantize` (FP8 linears),
before the fusion passes; rewrites `state.weights`.
"""

from __future__ import annotations

from rdnac.compiler.passes import CompileState
from rdnac.errors import RdnacError
from rdnac.ir import mxfp4
from rdnac.ir.graph import WeightSpec

NAME = "quantize_mxfp4"


def run(state: CompileState) -> None:
    if state.options.quantize != "mxfp4":
        return
    graph, weights = state.graph, state.weights
    experts = [n for n in graph.nodes if n.op == "moe_experts"]
    if not experts:
        already = any(n.op == "moe_experts_mxfp4" for n in graph.nodes)
        if not already:
            raise RdnacError(f"--quantize mxfp4 requires a mixture-of-experts model (it quantizes the experts); "
                             f"got {graph.attrs.get('architecture')} with no expert layers; use --quantize fp8")
        state.decide(NAME, "-", "nothing to do", "the checkpoint's experts are MXFP4 already")
        return
    state.decide(NAME, "-", f"--quantize mxfp4: the experts of {len(experts)} layers to MXFP4 (e2m1, e8m0 per "
                 f"{mxfp4.BLOCK})", "attention, router, embedding and logits keep the compute dtype")
    for node in experts:
        x, route_w, ids, w13, w2, *biases = node.inputs
        packed = []
        for wname in (w13, w2):
            w = weights[wname]  # [E, N, K]
            k = w.shape[-1]
            if k % mxfp4.BLOCK:
                raise RdnacError(f"--quantize mxfp4 requires expert weights whose input features are a multiple of "
                                 f"{mxfp4.BLOCK}; {wname} is {list(w.shape)} (K = {k}); compile without --quantize")
            blocks, scales = mxfp4.quantize(w)
            deq = mxfp4.dequantize(blocks, scales)
            rel_err = ((deq - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
            source = graph.weights[wname].source or wname
            for suffix, t, scheme in (("blocks", blocks, "mxfp4"), ("scales", scales, "mxfp4-e8m0")):
                name = f"{wname}_{suffix}"
                assert name not in graph.weights, f"{name} already exists"
                weights[name] = t
                graph.weights[name] = WeightSpec("uint8", tuple(t.shape), scheme, source=f"quantize_mxfp4({source})")
                packed.append(name)
            del weights[wname], graph.weights[wname]
            state.decide(NAME, node.name, f"quantized {wname} {list(w.shape)} to MXFP4",
                         f"blocks {list(blocks.shape)} + e8m0 scales {list(scales.shape)}; "
                         f"weight relative error {rel_err:.2%}")
        node.op = "moe_experts_mxfp4"
        node.inputs = [x, route_w, ids, *packed, *biases]
