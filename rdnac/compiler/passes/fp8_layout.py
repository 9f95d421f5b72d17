"""Per-target FP8 weight transforms for `linear_fp8` and `moe_experts_fp8_block` nodes, recorded per weight.

Runs after the kernel-independent passes, before kernel selection:

- FP8 format: gfx942 computes in e4m3fnuz, where the same bits mean half
  the value of OCP e4m3fn (and 0x80 is NaN). Weights are converted bit-exactly
  (`rdnac.ir.fp8.e4m3fn_to_e4m3fnuz`) and the factor 2 is folded into the
  weight scale (and a static input scale, so x / input_scale lands on the same
  grid). Other targets, cpu included, keep e4m3fn.
- w8a8 or a16w8: where the probed FP8 `tl.dot` is not native for the weight
  format (gfx1151 has no FP8 hardware), activations stay in the compute dtype
  (act_scheme "none") and the kernel upcasts the FP8 weight; a static input
  scale is then unused and dropped.

The cpu target runs the reference interpreter, which computes every scheme
in float32: nothing changes there.
"""

from __future__ import annotations

import torch

from rdnac.compiler.passes import CompileState
from rdnac.ir.fp8 import e4m3fn_to_e4m3fnuz
from rdnac.ir.graph import Graph, WeightSpec
from rdnac.targets import Target

NAME = "fp8_layout"
# per op: the (FP8 weight, its scale) input positions; moe_experts_fp8_block's are w13 and w2 (DeepSeek's experts)
FP8_WEIGHTS = {"linear_fp8": ((1, 2),), "moe_experts_fp8_block": ((3, 4), (5, 6))}


def run(state: CompileState) -> None:
    """Reads the target's probed capabilities (`state.capabilities`, None on cpu)."""
    graph, weights, target, capabilities = state.graph, state.weights, state.target, state.capabilities
    nodes = [n for n in graph.nodes if n.op in FP8_WEIGHTS]
    if not nodes:
        return
    if not target.is_gpu:
        for node in nodes:
            state.decide(NAME, node.inputs[FP8_WEIGHTS[node.op][0][0]], f"kept {node.attrs['fp8_format']}, "
                         f"activations {node.attrs['act_scheme']}",
                         "cpu: the reference interpreter computes in float32")
        return
    assert capabilities is not None, f"fp8_layout on {target.name} requires the probed capabilities"
    fmt = target.fp8_format or "e4m3fn"  # no FP8 hardware: the kernel upcasts e4m3fn weights
    probe = capabilities.fp8_dot(fmt)
    is_native = target.fp8_format is not None and probe.is_native
    converted: set[str] = set()
    for node in nodes:
        if node.attrs["fp8_format"] != fmt:
            _to_fnuz(graph, weights, state, node, fmt, converted)
        for wname in [node.inputs[w] for w, _ in FP8_WEIGHTS[node.op]]:
            if wname not in converted:
                converted.add(wname)
                state.decide(NAME, wname, f"kept {fmt} bits", f"{target.name} computes FP8 as {fmt}"
                             if target.fp8_format else f"{target.name} has no FP8 hardware; the kernel upcasts "
                             f"{fmt} weights")
        if node.attrs["act_scheme"] == "none":
            continue
        if is_native:
            state.decide(NAME, node.name, f"w8a8 in {fmt}, activations {node.attrs['act_scheme']}",
                         f"probe: tl.dot({fmt}) on {target.name} emits {', '.join(probe.matrix_instructions)}")
        else:
            _to_a16w8(graph, state, node, target, fmt, probe)
    _drop_unread(graph, weights, state)


def _to_fnuz(graph: Graph, weights: dict[str, torch.Tensor], state: CompileState, node, fmt: str,
             converted: set[str]) -> None:
    assert node.attrs["fp8_format"] == "e4m3fn" and fmt == "e4m3fnuz", (node.name, node.attrs["fp8_format"], fmt)
    fp8_names = [node.inputs[w] for w, _ in FP8_WEIGHTS[node.op]]
    scales = [node.inputs[s] for _, s in FP8_WEIGHTS[node.op]]
    scales += [node.inputs[3]] if node.attrs["act_scheme"] == "static" else []
    for name in [*fp8_names, *scales]:
        if name in converted:
            continue
        converted.add(name)
        spec = graph.weights[name]
        if name in fp8_names:
            bits, factor = e4m3fn_to_e4m3fnuz(weights[name])
            num_neg_zero = int((weights[name].view(torch.uint8) == 0x80).sum())
            weights[name] = bits
            graph.weights[name] = WeightSpec("float8_e4m3fnuz", spec.shape, spec.scheme, spec.source)
            state.decide(NAME, name, "e4m3fn -> e4m3fnuz bits", f"{fmt} halves the value of each bit pattern; "
                         f"bits kept, x{factor:g} folded into the scale; {num_neg_zero} -0 (0x80, NaN in fnuz) -> +0")
        else:
            weights[name] = weights[name] * 2.0  # exact in float32
            state.decide(NAME, name, "scale x2", "folds the e4m3fn -> e4m3fnuz factor (same grid, half the value)")
    node.attrs["fp8_format"] = fmt


def _to_a16w8(graph: Graph, state: CompileState, node, target: Target, fmt: str, probe) -> None:
    was = node.attrs["act_scheme"]
    if was == "static":
        del node.inputs[3]  # (x, weight, weight_scale, input_scale, bias?) -> no input_scale
    node.attrs["act_scheme"] = "none"
    why = (f"{target.name} has no FP8 dot (probe: {probe.reason or 'no FP8 matrix instruction'})"
           if target.fp8_format is None else
           f"probe: tl.dot({fmt}) on {target.name} is not native "
           f"({', '.join(probe.matrix_instructions) or probe.reason})")
    state.decide(NAME, node.name, f"a16w8: activations {was} -> none", f"{why}; the kernel upcasts the FP8 weight "
                 "and multiplies in the compute dtype")


def _drop_unread(graph: Graph, weights: dict[str, torch.Tensor], state: CompileState) -> None:
    read = {name for n in graph.nodes for name in n.inputs}
    for name in [w for w in graph.weights if w not in read]:
        del graph.weights[name]
        weights.pop(name, None)
        state.decide(NAME, name, "removed weight", "a16w8 does not read the static input scale")
