"""Merge linears that read the same input into one wider GEMM.

    q = linear(x, Wq, bq); k = linear(x, Wk, bk); v = linear(x, Wv, bv)
        ==>   qkv = linear(x, cat(Wq, Wk, Wv), cat(bq, bk, bv)); q, k, v = split(qkv, sizes=[Nq, Nk, Nv])
    g = linear(x, Wg); u = linear(x, Wu); m = gated_act(g, u)
        ==>   gu = linear(x, cat(Wg, Wu)); m = gated_act(gu)

One launch reads x once instead of three (two) times, and the wider N fills
the GPU better at decode. `split` returns column views, so the nodes after
it are unchanged (their kernels accept rows with a stride). A pair that
feeds a `gated_act` as (gate, up) uses its one-input form instead (gate
first, then up), which needs no split.

The merged weight is `<parent>.qkv_proj.weight` (`<parent>.gate_up_proj.weight`)
and replaces its parts in the weights dict; its WeightSpec.source lists them.

`linear_fp8` (and `linear_int8`) parts merge only when they share weight_scheme, act_scheme,
fp8_format and block_size (and all or none have a bias). The fp8 bits never
change: per-tensor weight scales become one per-channel vector [N] (each
part's scale repeated over its rows: exact), per-channel scales concatenate,
block scales concatenate along N when every part's N is a multiple of the
block's bn (else the rows of a block would mix two parts: skipped). A static
input scale must be the same value in every part (else skipped).

This pass rewrites weights: `state.weights` and the graph's weight specs.
"""

from __future__ import annotations

import torch

from rdnac.compiler.passes import CompileState
from rdnac.ir.graph import Graph, Node, WeightSpec

NAME = "merge_linears"
_OPS = ("linear", "linear_fp8", "linear_int8")


def run(state: CompileState) -> None:
    graph, weights = state.graph, state.weights
    producer_index = {n.name: i for i, n in enumerate(graph.nodes)}
    readers: dict[str, list[Node]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, []).append(node)
    groups: dict[tuple[str, str], list[Node]] = {}
    for node in graph.nodes:
        if node.op in _OPS:
            groups.setdefault((node.inputs[0], node.op), []).append(node)
    replace: dict[str, list[Node]] = {}  # first part's name -> nodes to emit in its place
    removed: set[str] = set()
    for (_x, _op), parts in groups.items():
        if len(parts) < 2:
            continue
        act = _gated_act_user(parts, readers)
        why_not = _why_not(graph, weights, parts, readers)
        if why_not:
            state.decide(NAME, ", ".join(p.name for p in parts), "kept separate", why_not)
            continue
        stem = _merged_stem([p.inputs[1].removesuffix(".weight") for p in parts])
        node_stem = _merged_stem([p.name for p in parts])
        if stem is None or node_stem is None or node_stem in producer_index or \
                any(f"{stem}.{s}" in graph.weights for s in ("weight", "weight_scale", "input_scale", "bias")):
            state.decide(NAME, ", ".join(p.name for p in parts), "kept separate",
                         "no unused merged name (the parts do not share a parent module)")
            continue
        sizes = [int(weights[p.inputs[1]].shape[0]) for p in parts]
        merged, detail = _merge(graph, weights, parts, stem, node_stem, sizes)
        emitted = [merged]
        if act is not None:
            act.inputs = [merged.outputs[0]]
            how = f"gated_act {act.name} reads it in its one-input form (gate first, then up)"
        else:
            emitted.append(Node(f"{node_stem}.split", "split", [merged.outputs[0]], [p.outputs[0] for p in parts],
                                {"sizes": list(sizes)}))
            how = f"split {list(sizes)} gives {', '.join(p.outputs[0] for p in parts)} as column views"
        replace[parts[0].name] = emitted
        removed.update(p.name for p in parts[1:])
        state.decide(NAME, merged.name, f"merged {', '.join(p.name for p in parts)} into one {merged.op} "
                     f"[{sum(sizes)}, {graph.weights[merged.inputs[1]].shape[1]}]{detail}",
                     f"one GEMM reads {parts[0].inputs[0]} once instead of {len(parts)} times; {how}")
    graph.nodes = [m for n in graph.nodes if n.name not in removed for m in replace.get(n.name, [n])]


def _gated_act_user(parts: list[Node], readers: dict[str, list[Node]]) -> Node | None:
    """The gated_act reading exactly (part0, part1) as (gate, up), when nothing else reads them."""
    if len(parts) != 2:
        return None
    outs = [p.outputs[0] for p in parts]
    users = [readers.get(o, []) for o in outs]
    if len(users[0]) != 1 or len(users[1]) != 1 or users[0][0] is not users[1][0]:
        return None
    act = users[0][0]
    return act if act.op == "gated_act" and act.inputs == outs else None


def _why_not(graph: Graph, weights: dict, parts: list[Node], readers: dict[str, list[Node]]) -> str:
    """Why `parts` cannot merge, or "" when they can."""
    w0 = graph.weights[parts[0].inputs[1]]
    for p in parts:
        w = graph.weights[p.inputs[1]]
        if w.dtype != w0.dtype or len(w.shape) != 2 or w.shape[1] != w0.shape[1]:
            return f"weights differ in dtype or in_features ({p.inputs[1]}: {w.dtype} {list(w.shape)})"
        for name in p.inputs[1:]:
            others = [r.name for r in readers[name] if r is not p]
            if others:
                return f"{name} is also read by {', '.join(others)}"
            if name not in weights or name not in graph.weights:
                return f"{name} is not a weight"
    if parts[0].op == "linear":
        if len({len(p.inputs) for p in parts}) != 1:
            return "some parts have a bias and some do not"
        return ""
    keys = ("weight_scheme", "act_scheme", "fp8_format", "block_size", "has_bias")
    for k in keys:
        values = [p.attrs.get(k) for p in parts]
        if any(v != values[0] for v in values):
            return f"parts differ in {k}: {values}"
    a = parts[0].attrs
    if a["weight_scheme"] == "block":
        bn = a["block_size"][0]
        bad = [f"{p.name} N={graph.weights[p.inputs[1]].shape[0]}" for p in parts
               if graph.weights[p.inputs[1]].shape[0] % bn]
        if bad:
            return f"block scales cannot concatenate: N not a multiple of the block's bn {bn} ({', '.join(bad)})"
    if a["act_scheme"] == "static":
        scales = [weights[p.inputs[3]] for p in parts]
        if any(not torch.equal(s.reshape(-1), scales[0].reshape(-1)) for s in scales):
            return f"static input scales differ ({', '.join(f'{s.reshape(-1)[0].item():g}' for s in scales)})"
    return ""


def _merged_stem(names: list[str]) -> str | None:
    """`a.b.q_proj`, `a.b.k_proj`, `a.b.v_proj` -> `a.b.qkv_proj`; gate_proj, up_proj -> gate_up_proj."""
    split = [n.rpartition(".") for n in names]
    parent = split[0][0]
    if any(s[0] != parent for s in split):
        return None
    leaves = [s[2] for s in split]
    suffix = "_proj" if all(leaf.endswith("_proj") for leaf in leaves) else ""
    stems = [leaf.removesuffix(suffix) if suffix else leaf for leaf in leaves]
    joined = ("" if all(len(s) == 1 for s in stems) else "_").join(stems) + suffix
    return f"{parent}.{joined}" if parent else joined


def _merge(graph: Graph, weights: dict[str, torch.Tensor], parts: list[Node], stem: str,
           node_stem: str, sizes: list[int]) -> tuple[Node, str]:
    """The merged node and a note; updates graph.weights and weights (the parts' tensors removed)."""
    x = parts[0].inputs[0]
    wnames = [p.inputs[1] for p in parts]
    detail = ""

    def put(name: str, tensor: torch.Tensor, like: list[str], scheme: str | None = None) -> str:
        spec = graph.weights[like[0]]
        weights[name] = tensor.contiguous()
        graph.weights[name] = WeightSpec(str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
                                         scheme if scheme is not None else spec.scheme,
                                         source="cat(" + ", ".join(graph.weights[n].source or n for n in like) + ")")
        return name

    def drop(names: list[str]) -> None:
        for n in names:
            graph.weights.pop(n, None)
            weights.pop(n, None)

    wname = put(f"{stem}.weight", torch.cat([weights[w] for w in wnames], 0), wnames)
    ins = [x, wname]
    attrs: dict = {}
    if parts[0].op == "linear":
        if len(parts[0].inputs) == 3:
            bnames = [p.inputs[2] for p in parts]
            ins.append(put(f"{stem}.bias", torch.cat([weights[b] for b in bnames], 0), bnames))
            drop(bnames)
    else:
        a = parts[0].attrs
        attrs = dict(a)
        snames = [p.inputs[2] for p in parts]
        if a["weight_scheme"] == "tensor":
            scale = torch.cat([weights[s].float().reshape(1).expand(n) for s, n in zip(snames, sizes)])
            attrs["weight_scheme"] = "channel"
            graph.weights[wname] = WeightSpec(graph.weights[wname].dtype, graph.weights[wname].shape,
                                              "int8-channel" if parts[0].op == "linear_int8" else "fp8-channel",
                                              graph.weights[wname].source)
            detail = "; per-tensor weight scales -> one per-channel scale (each repeated over its part's rows)"
        elif a["weight_scheme"] == "channel":
            scale = torch.cat([weights[s].float().reshape(-1) for s in snames])
        else:  # block: every part's N is a multiple of bn (checked), so block rows never mix parts
            scale = torch.cat([weights[s] for s in snames], 0)
        ins.append(put(f"{stem}.weight_scale", scale, snames, graph.weights[snames[0]].scheme))
        drop(snames)
        if a["act_scheme"] == "static":
            inames = [p.inputs[3] for p in parts]
            ins.append(put(f"{stem}.input_scale", weights[inames[0]].clone(), inames))
            drop(inames)
        if a.get("has_bias"):
            bnames = [p.inputs[-1] for p in parts]
            ins.append(put(f"{stem}.bias", torch.cat([weights[b] for b in bnames], 0), bnames))
            drop(bnames)
    drop(wnames)
    return Node(node_stem, parts[0].op, ins, [node_stem], attrs), detail
