"""Fuse an `rms_norm` into the one GEMM that reads its normalized output.

    y[, h] = rms_norm(x[, r], w_n); z = linear(y, W, [b])            (or linear_gated_act(y, W, [b], act))
        ==>   z[, h] = rms_norm_linear(x, [r], w_n, W, [b]; has_residual, act)

At decode the GEMM computes the norm in its prologue (`rdnac.kernels.norm_gemm`):
one launch fewer per norm, which at one token is nearly all of the norm's cost
(a launch and a dependency wait for a 16 KB read). Above decode sizes the
node's config runs the norm kernel, then the GEMM, as before.

Fused only when y is read by exactly one node, a `linear` or `linear_gated_act`
taking it as x, whose other inputs are weights, in a float plan (bf16, fp16,
fp32) whose norm weight, GEMM weight and activations share one dtype. FP8 plans
are left whole to `fuse_norm_quant` (the norm quantizes for its FP8 GEMMs).
Runs after `fuse_gated_linear` so the MLP's norm meets its fused gate/up GEMM.
The fused node takes the GEMM's name and sits where the norm was (the GEMM's
other inputs are weights, so all it reads is defined there); h keeps its name.
"""

from __future__ import annotations

from rdnac.compiler.passes import PassContext
from rdnac.compiler.passes.fuse_norm_quant import value_readers, value_specs
from rdnac.ir.graph import Graph, Node

NAME = "fuse_norm_linear"
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
FP8_OPS = ("linear_fp8", "rms_norm_quant", "gated_act_quant")


def run(graph: Graph, ctx: PassContext) -> Graph:
    fp8 = sorted({n.op for n in graph.nodes if n.op in FP8_OPS})
    if fp8:
        ctx.decide(NAME, "-", "skipped", f"an FP8 plan ({', '.join(fp8)}): its norms fuse with the activation "
                   "quantization (fuse_norm_quant) instead")
        return graph
    readers = value_readers(graph)
    specs = value_specs(graph)
    replace: dict[str, Node] = {}  # norm name -> fused node (emitted where the norm was)
    removed: set[str] = set()
    for norm in graph.nodes:
        if norm.op != "rms_norm":
            continue
        gemm = _single_reader(norm, readers)
        why_not = _why_not(graph, norm, gemm, readers, specs)
        if why_not:
            ctx.decide(NAME, norm.name, "kept", why_not)
            continue
        has_residual = len(norm.inputs) == 3
        act = gemm.attrs["act"] if gemm.op == "linear_gated_act" else ""
        attrs = {**norm.attrs, "has_residual": has_residual, "act": act}
        fused = Node(gemm.name, "rms_norm_linear", [*norm.inputs, *gemm.inputs[1:]],
                     [gemm.outputs[0], *norm.outputs[1:]], attrs)
        replace[norm.name] = fused
        removed.add(gemm.name)
        weight = graph.weights[gemm.inputs[1]].shape
        ctx.decide(NAME, gemm.name, f"fused {norm.name}{' (with its residual add)' if has_residual else ''} into "
                   f"{gemm.op} [{weight[0]}, {weight[1]}]",
                   "decode: the GEMM normalizes its A tiles in its prologue, one launch fewer (the norm's launch and "
                   "dependency wait); above decode sizes the config runs the norm kernel, then the GEMM"
                   + (f"; {norm.outputs[1]} is still written" if has_residual else ""))
    graph.nodes = [replace.get(n.name, n) for n in graph.nodes if n.name not in removed]
    return graph


def _users(value: str, readers: dict[str, list[Node]]) -> list[Node]:
    return list({n.name: n for n in readers.get(value, [])}.values())  # a node reading it twice counts once


def _single_reader(norm: Node, readers: dict[str, list[Node]]) -> Node | None:
    users = _users(norm.outputs[0], readers)
    return users[0] if len(users) == 1 else None


def _why_not(graph: Graph, norm: Node, gemm: Node | None, readers: dict[str, list[Node]], specs: dict) -> str:
    """Why `norm` cannot fuse into `gemm`, the one reader of its output ("" when it can)."""
    y = norm.outputs[0]
    users = _users(y, readers)
    if gemm is None:
        return f"{y} is read by {len(users)} nodes, not one GEMM" + \
            (f" ({', '.join(f'{u.name} ({u.op})' for u in users)})" if users else "")
    if gemm.op not in ("linear", "linear_gated_act"):
        return f"{y} is read by {gemm.name} ({gemm.op}), not a linear or linear_gated_act"
    if y in graph.outputs:
        return f"{y} is a graph output"
    if gemm.inputs[0] != y or y in gemm.inputs[1:]:
        return f"{gemm.name} reads {y} other than as its x"
    not_weights = [name for name in gemm.inputs[1:] if name not in graph.weights]
    if not_weights:
        return f"{gemm.name}'s {', '.join(not_weights)} are not weights (the fused node sits where the norm is)"
    dtypes = {"activation": specs[norm.inputs[0]].dtype, "norm weight": graph.weights[norm.inputs[-1]].dtype,
              "GEMM weight": graph.weights[gemm.inputs[1]].dtype}
    if len(set(dtypes.values())) != 1 or dtypes["activation"] not in FLOAT_DTYPES:
        return "requires one float dtype (bfloat16, float16, float32) for activation, norm weight and GEMM weight; " \
               f"got {', '.join(f'{k} {v}' for k, v in dtypes.items())}"
    return ""
