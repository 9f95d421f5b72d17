"""Fuse the FP8 (or int8) activation quantization of `linear_fp8` (`linear_int8`) readers into the `rms_norm`
that feeds them (and, per token, into a GDN layer's `gated_rms_norm`: `gated_rms_norm_quant`).

    y[, h] = rms_norm(x[, r], w); out = linear_fp8(y, W, s_w, [b])   (act_scheme dynamic_*)
        ==>   y.fp8, y.fp8_scale[, h] = rms_norm_quant(x[, r], w)
              out = linear_fp8(y.fp8, W, s_w, y.fp8_scale, [b])      (act_scheme "prequantized")

The norm writes fp8 values and scales instead of a bf16 row that each
linear's wrapper would read back and quantize in a launch of its own: one
launch fewer per norm and half the bytes between them. The values are the
same bit for bit (see `rdnac.kernels.rms_norm_quant`). The residual sum keeps
its name, so its later readers are unchanged.

An int8 reader (`linear_int8`, per-token) is fused the same way, with format
"int8". Fused only when EVERY reader of y is a `linear_fp8` / `linear_int8` quantizing dynamically
("dynamic_token" or "dynamic_group") with one format and group; static
input scales and a16w8 ("none") are left alone, with the reason logged. It
runs after `fp8_layout`, which sets the final format and may turn a node
a16w8. `fuse_act_quant` shares the helpers below.
"""

from __future__ import annotations

from collections.abc import Callable

from rdnac.compiler.passes import CompileState
from rdnac.ir.graph import Graph, Node, TensorSpec
from rdnac.ir.ops import OPS

NAME = "fuse_norm_quant"


def run(state: CompileState) -> None:
    fuse_into_producer(state, NAME, "rms_norm", "rms_norm_quant", "norm")
    # a GDN layer's gated norm feeding its out_proj: per-token scales only (one program holds a token's heads)
    fuse_into_producer(state, NAME, "gated_rms_norm", "gated_rms_norm_quant", "gated norm",
                       refuse=lambda node, quant: "" if quant[1] == 0 else
                       f"the gated norm's kernel writes per-token scales; got {quant_label(*quant)}")


def fuse_into_producer(state: CompileState, pass_name: str, op: str, fused_op: str, noun: str,
                       refuse: Callable[[Node, tuple[str, int]], str] | None = None,
                       how: str = "which the linears read as they are") -> None:
    """Replace each `op` node whose first output only FP8 linears read, all quantizing it the same way,
    by `fused_op` writing (fp8 values, scales, the node's other outputs); its readers take them as they are.
    `refuse(node, (fp8_format, group))`: why the producer's kernel cannot write that quantization, or ""."""
    graph = state.graph
    readers = value_readers(graph)
    specs = value_specs(graph)
    for i, node in enumerate(graph.nodes):
        if node.op != op:
            continue
        y = node.outputs[0]
        quant, why_not = shared_quant(graph, y, readers.get(y, []))
        if quant is not None and refuse is not None and (why_not := refuse(node, quant)):
            quant = None
        if quant is None:
            if why_not:
                state.decide(pass_name, node.name, "kept unfused", why_not)
            continue
        fmt, group = quant
        q, scale = prequantize_readers(graph, y, readers[y], fmt, group, specs[y].dtype)
        graph.nodes[i] = Node(node.name, fused_op, list(node.inputs), [q, scale, *node.outputs[1:]],
                              {**node.attrs, "fp8_format": fmt, "group": group})
        state.decide(pass_name, node.name, f"fused {quant_label(fmt, group)} quantization of "
                     f"{', '.join(r.name for r in readers[y])} into the {noun}",
                     f"the {noun} writes {'int8' if fmt == 'int8' else 'fp8'} {q} and scales {scale}, {how}: "
                     "one launch fewer and no bf16 round trip; the same bits as quantizing in the linear")


# ---------------------------------------------------------------- shared with fuse_act_quant

_DYNAMIC = ("dynamic_token", "dynamic_group")
QUANT_LINEARS = ("linear_fp8", "linear_int8")  # the linears that read 8-bit activations


def quant_format(node: Node) -> str:
    """The 8-bit format a quantizing linear reads its activations in ("int8" for linear_int8)."""
    return "int8" if node.op == "linear_int8" else node.attrs["fp8_format"]


def value_readers(graph: Graph) -> dict[str, list[Node]]:
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    return readers


def value_specs(graph: Graph) -> dict[str, TensorSpec]:
    """Type and shape of every value, by the ops' shape rules."""
    specs: dict[str, TensorSpec] = dict(graph.inputs)
    specs.update((k, TensorSpec(w.dtype, w.shape)) for k, w in graph.weights.items())
    for node in graph.nodes:
        specs.update(zip(node.outputs, OPS[node.op].infer(node.attrs, [specs[n] for n in node.inputs])))
    return specs


def quant_label(fmt: str, group: int) -> str:
    return f"{fmt} per-token" if not group else f"{fmt} group-{group}"


def shared_quant(graph: Graph, value: str, readers: list[Node]) -> tuple[tuple[str, int] | None, str]:
    """((fp8_format, group), "") when every reader of `value` is a linear_fp8 that quantizes it
    dynamically the same way; else (None, why not), the reason "" when no reader is an FP8 linear."""
    fp8 = [r for r in readers if r.op in QUANT_LINEARS and r.inputs[0] == value]
    if not fp8:
        return None, ""
    others = [r for r in readers if r not in fp8]
    if others:
        return None, f"{value} is also read by {', '.join(f'{r.name} ({r.op})' for r in others)}, not FP8 linears"
    if value in graph.outputs:
        return None, f"{value} is a graph output"
    for r in fp8:
        scheme = r.attrs["act_scheme"]
        if scheme == "static":
            return None, f"{r.name} quantizes with its static input scale (activations static)"
        if scheme == "none":
            return None, f"{r.name} is a16w8 (activations none): it reads unquantized activations"
        if scheme not in _DYNAMIC:
            return None, f"{r.name} has act_scheme {scheme!r}"
    quants = {(quant_format(r), r.attrs["block_size"][1] if r.attrs["act_scheme"] == "dynamic_group" else 0)
              for r in fp8}
    if len(quants) > 1:
        return None, f"its FP8 readers quantize differently ({', '.join(quant_label(*q) for q in sorted(quants))})"
    fmt, group = quants.pop()
    if group & (group - 1):
        return None, f"the fused kernels need a power-of-two group; got {group}"
    return (fmt, group), ""


def prequantize_readers(graph: Graph, value: str, readers: list[Node], fmt: str, group: int,
                        out_dtype: str) -> tuple[str, str]:
    """Name the fp8 values and scales of `value` and make its readers take them ("prequantized")."""
    kind = "int8" if fmt == "int8" else "fp8"
    q, scale = f"{value}.{kind}", f"{value}.{kind}_scale"
    taken = {n for node in graph.nodes for n in node.outputs} | set(graph.inputs) | set(graph.weights)
    assert q not in taken and scale not in taken, f"{q} or {scale} already names a value"
    for r in readers:  # (x, weight, weight_scale, [bias]) -> (q, weight, weight_scale, scale, [bias])
        r.inputs = [q, r.inputs[1], r.inputs[2], scale, *r.inputs[3:]]
        r.attrs = {**r.attrs, "act_scheme": "prequantized", "group": group,
                   "out_dtype": r.attrs.get("out_dtype") or out_dtype}  # an FP8 lm_head keeps float32
        assert quant_format(r) == fmt
    return q, scale
