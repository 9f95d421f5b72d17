"""Compile-time FP8 / INT8 quantization of a float checkpoint's linears (`--quantize fp8 | fp8-block | int8`).
(`--quantize mxfp4` of a MoE checkpoint's experts is the next pass, `quantize_mxfp4`.)

    y = linear(x, W)   ==>   y = linear_fp8(x, bits(W), scale(W))   (int8: linear_int8)

`fp8`: one scale per output channel (amax/448), activations quantized per
token at run time. `fp8-block`: one scale per 128x128 block, activations per
(token, 128 columns), the DeepSeek-V3 layout. `int8` (W8A8): one scale per
output channel (amax/127, symmetric), activations per token at run time.

A per-layer rule says which linears keep the compute dtype: node or weight
names matching a pattern of `SKIP[scheme]` (int8: a Gated DeltaNet layer's
in_proj, which feeds the recurrence), or the `--quantize-skip` patterns,
which replace that list. Only `linear` nodes change:
the logits projection and the embedding keep the compute dtype (their error
would reach every token), as do linears that share a weight and MoE routers. Each weight's
quantization and its relative error are recorded. Runs first, before the
fusion passes, and rewrites `state.weights`. `--fp8-lm-head` is the next
pass, `quantize_lm_head`.
"""

from __future__ import annotations

import re

import torch

from rdnac.compiler.passes import CompileState
from rdnac.ir.fp8 import FP8_MAX, to_format
from rdnac.ir.graph import WeightSpec

NAME = "quantize"
BLOCK = (128, 128)
SCHEMES = {  # --quantize value -> (weight_scheme, act_scheme, block_size)
    "fp8": ("channel", "dynamic_token", None),
    "fp8-block": ("block", "dynamic_group", BLOCK),
    "int8": ("channel", "dynamic_token", None),
}
# The default rule: linears whose node or weight names match (re.search) keep the compute dtype, with why.
# --quantize-skip PATTERN (repeatable) replaces the scheme's list; `--quantize-skip none` empties it.
SKIP = {
    "int8": {r"\.in_proj_(qkvz|qkv|z|ba|b|a)\b": "a Gated DeltaNet in_proj feeds the recurrence: int8 there broke "
                                                  "gsm8k in a real bring-up (out_proj and the MLPs took int8 safely)",
             r"shared_expert_gate\b": "a gate: its one output scales the whole shared expert (llm-compressor's "
                                      "recipes keep it float too)"},
}


def quantize_weight(w: torch.Tensor, weight_scheme: str, block_size: tuple[int, int] | None = None,
                    fmt: str = "e4m3fn", headroom: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 (`fmt` "int8": int8) bits [N, K] and a float32 scale with W ~= bits * scale, scale = amax / FP8_MAX
    (times `headroom`, >= 1, same shape as the scale) per tensor ([1]), output channel ([N]) or block ([ceil(N/bn), ceil(K/bk)]);
    an all-zero group gets scale 1."""
    wf = w.float()
    fp8_max = FP8_MAX[fmt]
    if weight_scheme == "tensor":
        amax = wf.abs().amax().reshape(1)
    elif weight_scheme == "channel":
        amax = wf.abs().amax(1)  # [N]
    elif weight_scheme == "block":
        bn, bk = block_size
        n, k = wf.shape
        padded = torch.nn.functional.pad(wf, (0, (-k) % bk, 0, (-n) % bn))
        grid = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
        amax = grid.abs().amax((1, 3))  # [N/bn, K/bk]
    else:
        raise ValueError(f"unknown FP8 weight scheme {weight_scheme!r}")
    scale = torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax)) * headroom
    if weight_scheme == "tensor":
        full = scale.reshape(1, 1)
    elif weight_scheme == "channel":
        full = scale[:, None]
    else:
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[: wf.shape[0], : wf.shape[1]]
    bits = to_format((wf / full).clamp(-fp8_max, fp8_max), fmt)
    return bits, scale.float()


def skip_rule(scheme: str, patterns: tuple[str, ...] | None) -> dict[str, str]:
    """{pattern: why} of the linears that keep the compute dtype under `--quantize scheme`."""
    if patterns is None:
        return dict(SKIP.get(scheme, {}))
    return {p: "--quantize-skip" for p in patterns if p != "none"}


def _skipped_by(rule: dict[str, str], names: list[str]) -> str | None:
    return next((p for p in rule if any(re.search(p, n) for n in names)), None)


def run(state: CompileState) -> None:
    from rdnac.ir.fp8 import dequantize_weight

    scheme = state.options.quantize
    if scheme not in SCHEMES:  # None, or mxfp4 (the quantize_mxfp4 pass)
        return
    graph, weights = state.graph, state.weights
    weight_scheme, act_scheme, block_size = SCHEMES[scheme]
    is_int8 = scheme == "int8"
    fmt, op, label = ("int8", "linear_int8", "int8") if is_int8 else ("e4m3fn", "linear_fp8", "fp8")
    tag = f"fp8-block{block_size[0]}x{block_size[1]}" if block_size else f"{label}-{weight_scheme}"
    rule = skip_rule(scheme, state.options.quantize_skip)
    readers: dict[str, list[str]] = {}
    op_of = {node.name: node.op for node in graph.nodes}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node.name)
    kept = "; ".join(f"names matching {p!r} ({why})" for p, why in rule.items()) or "none by name"
    state.decide(NAME, "-", f"--quantize {scheme}: linears to {tag}, activations {act_scheme}",
                 f"logits and embedding weights keep the compute dtype; linears kept by the rule: {kept}")
    if is_int8 and any(node.op.startswith("moe_experts") for node in graph.nodes):
        state.decide(NAME, "-", "routed experts kept in the compute dtype", "--quantize int8 covers linears; the "
                     "fused MoE kernels have no int8 path (the shared expert's linears are int8)")
    for node in graph.nodes:
        if node.op != "linear":
            continue
        x, wname, *bias = node.inputs
        if any(op_of[r] == "moe_route" for r in readers.get(node.outputs[0], [])):
            state.decide(NAME, node.name, f"kept {wname} in {graph.weights[wname].dtype}",
                         f"an MoE router: its logits pick experts discretely, so {label.upper()} error would flip "
                         "top-k choices")
            continue
        if len(readers[wname]) > 1:
            state.decide(NAME, node.name, f"kept {wname} in {graph.weights[wname].dtype}",
                         f"the weight is shared with {', '.join(r for r in readers[wname] if r != node.name)}")
            continue
        source = graph.weights[wname].source or wname
        pattern = _skipped_by(rule, [node.name, wname, source])
        if pattern is not None:
            state.decide(NAME, node.name, f"kept {wname} in {graph.weights[wname].dtype}",
                         f"matches {pattern!r}: {rule[pattern]}")
            continue
        w = weights[wname]  # [N, K]
        bits, scale = quantize_weight(w, weight_scheme, block_size, fmt)
        sname = wname.removesuffix(".weight") + ".weight_scale"
        assert sname not in graph.weights, f"{sname} already exists"
        deq = dequantize_weight(bits, scale, weight_scheme, block_size)
        rel_err = ((deq - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
        weights[wname], weights[sname] = bits, scale
        graph.weights[wname] = WeightSpec(str(bits.dtype).removeprefix("torch."), tuple(bits.shape), tag,
                                          source=source)
        graph.weights[sname] = WeightSpec("float32", tuple(scale.shape), f"{label}-scale",
                                          source=f"quantize({source})")
        node.op = op
        node.inputs = [x, wname, sname, *bias]
        node.attrs = ({"weight_scheme": weight_scheme, "act_scheme": act_scheme, "has_bias": bool(bias)} if is_int8
                      else {"weight_scheme": weight_scheme, "act_scheme": act_scheme, "fp8_format": fmt,
                            "block_size": list(block_size) if block_size else None, "has_bias": bool(bias)})
        state.decide(NAME, node.name, f"quantized {wname} to {tag}, activations {act_scheme}",
                     f"scale = amax/{FP8_MAX[fmt]:g} per {'block' if block_size else 'output channel'}; "
                     f"weight relative error {rel_err:.2%}")
