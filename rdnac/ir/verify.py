"""Check a graph's structure, attributes and shapes; errors name the node.

Run after every pass in tests. Shape rules come from `ops.OPS`; symbolic
dims (`T`, `B`...) compare by name.
"""

from __future__ import annotations

from rdnac.errors import GraphError
from rdnac.ir import collectives, linear_attention, mla, moe
from rdnac.ir.graph import Graph, Node, TensorSpec
from rdnac.ir.ops import ATTENTION_OPS, KV_CACHE_INPUTS, OPS

def _fail(graph: Graph, node: Node | None, message: str) -> None:
    where = f"node {node.name!r} ({node.op})" if node else "graph"
    raise GraphError(f"{where}: {message}\n{graph.dump()}")

def verify(graph: Graph) -> None:
    specs: dict[str, TensorSpec] = dict(graph.inputs)
    for name, w in graph.weights.items():
        if name in specs:
            _fail(graph, None, f"weight {name!r} shadows a graph input")
        specs[name] = TensorSpec(w.dtype, w.shape)
    written_caches: set[str] = set()
    seen_names: set[str] = set()
    for node in graph.nodes:
        if node.name in seen_names:
            _fail(graph, node, "duplicate node name")
        seen_names.add(node.name)
        opdef = OPS.get(node.op)
        if opdef is None:
            _fail(graph, node, f"unknown op; expected one of {sorted(OPS)}")
        if len(node.inputs) not in opdef.num_inputs:
            _fail(graph, node, f"expected {' or '.join(map(str, opdef.num_inputs))} inputs, found {len(node.inputs)}")
        for name in node.inputs:
            if name not in specs:
                _fail(graph, node, f"input {name!r} is not defined before this node")
        missing = [a for a in opdef.required_attrs if a not in node.attrs]
        if missing:
            _fail(graph, node, f"missing attributes {missing}")
        in_specs = [specs[name] for name in node.inputs]
        try:
            _check_shapes(graph, node, in_specs)
            if node.op in mla.OP_NAMES:
                mla.check(node.op, node.attrs, in_specs, lambda cond, what: cond or _fail(graph, node, what),
                          written_caches, node.inputs)
            elif node.op in collectives.OP_NAMES:
                collectives.check(node.op, node.attrs, in_specs, lambda cond, what: cond or _fail(graph, node, what))
            elif node.op == "moe_route":
                moe.check_route(node.attrs, in_specs, lambda cond, what: cond or _fail(graph, node, what))
            out_specs = opdef.infer(node.attrs, in_specs)
        except (IndexError, TypeError, ValueError, ZeroDivisionError, KeyError) as e:
            # an input of the wrong rank or an attribute of the wrong kind (a graph read from a damaged plan)
            _fail(graph, node, f"inputs {[(n, s.shape) for n, s in zip(node.inputs, in_specs)]} and attributes "
                               f"{node.attrs} do not fit the op ({type(e).__name__}: {e})")
        written_caches.update(node.inputs[i] for i in opdef.in_place)
        if node.op in ATTENTION_OPS and not set(node.inputs[1:3]) <= written_caches:
            _fail(graph, node, f"reads caches {node.inputs[1:3]} before any kv_cache_write to them")
        if len(out_specs) != len(node.outputs):
            _fail(graph, node, f"expected {len(out_specs)} outputs, found {len(node.outputs)}")
        for name, spec in zip(node.outputs, out_specs):
            if name in specs:
                _fail(graph, node, f"output {name!r} redefines an existing value")
            specs[name] = spec
    for name in graph.outputs:
        if name not in specs:
            _fail(graph, None, f"output {name!r} is never produced")

# Integer step metadata each op reads, by input position: (position, rank, what it is).
_INDEX_INPUTS = {
    "embedding": ((0, 1, "token_ids [T]"),),
    "rope": ((2, 1, "positions [T]"),),
    "kv_cache_write": ((2, 1, "slot_mapping [T]"),),
    "qk_norm_rope_cache": ((3, 1, "positions [T]"), (4, 1, "slot_mapping [T]")),
    "logits": ((1, 1, "logits_indices [R]"),),
    **{op: ((3, 2, "block_tables [B, MB]"), (4, 1, "seq_lens [B]"), (5, 1, "cu_seqlens_q [B+1]"),
            (6, 1, "positions [T]")) for op in ATTENTION_OPS},
}


# The matrix input of the ops that multiply by one: fixed sizes, never a per-step value.
_WEIGHT_INPUT = {"linear": 1, "linear_fp8": 1, "linear_int8": 1, "linear_gated_act": 1, "gated_act_linear_fp8": 1,
                 "embedding": 1, "logits": 2}
# ops whose "weight" may be an activation with a symbolic row count: the --fp8-lm-head pass gathers the
# logits rows of the final norm's output with an `embedding` (rows = tokens, columns fixed)


_KV_DTYPES = ("float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e4m3fnuz")


def _check_kv_caches(node: Node, ins: list[TensorSpec], expect) -> None:
    """K and V caches of one dtype; per-tensor scales positive, and 1.0 unless the cache is FP8."""
    k, v = (ins[i] for i in KV_CACHE_INPUTS[node.op])
    expect(k.dtype == v.dtype and k.dtype in _KV_DTYPES,
           f"k_cache and v_cache must share a dtype of {', '.join(_KV_DTYPES)}; got {k.dtype}, {v.dtype}")
    scales = [float(node.attrs.get(name, 1.0)) for name in ("k_scale", "v_scale")]
    expect(all(0 < s < float("inf") for s in scales), f"k_scale, v_scale must be positive and finite; got {scales}")
    expect(k.dtype.startswith("float8") or scales == [1.0, 1.0],
           f"k_scale, v_scale apply to FP8 caches only; got {scales} on {k.dtype} caches")


def _check_shapes(graph: Graph, node: Node, ins: list[TensorSpec]) -> None:
    a = node.attrs
    def expect(cond: bool, what: str) -> None:
        if not cond:
            _fail(graph, node, f"{what}; inputs {[ (n, s.shape) for n, s in zip(node.inputs, ins)]}")
    for i, rank, what in _INDEX_INPUTS.get(node.op, ()):
        expect(len(ins[i].shape) == rank and ins[i].dtype.startswith("int"), f"input {i} must be int {what}")
    weight = _WEIGHT_INPUT.get(node.op)
    if weight is not None:
        fixed = ins[weight].shape[1:] if node.op == "embedding" else ins[weight].shape
        expect(len(ins[weight].shape) == 2 and all(isinstance(d, int) for d in fixed),
               f"input {weight} must be a weight of fixed size [N, K]" + (" (rows may vary)" if node.op == "embedding"
                                                                          else ""))
    if node.op == "linear":
        expect(ins[0].shape[-1] == ins[1].shape[1], "x's last dim must equal weight's in_features")
        if len(ins) == 3:
            expect(ins[2].shape == (ins[1].shape[0],), "bias must be [out_features]")
    elif node.op == "linear_gated_act":
        expect(ins[0].shape[-1] == ins[1].shape[1], "x's last dim must equal weight's in_features")
        expect(isinstance(ins[1].shape[0], int) and ins[1].shape[0] % 2 == 0,
               "weight must be [2I, K] (gate rows, then up rows)")
        if len(ins) == 3:
            expect(ins[2].shape == (ins[1].shape[0],), "bias must be [2I]")
        expect(a["act"] in ("silu", "gelu", "gelu_tanh"), "act must be silu, gelu or gelu_tanh")
    elif node.op in ("rms_norm", "rms_norm_quant"):
        expect(ins[-1].shape == (ins[0].shape[-1],), "weight must be [hidden]")
        expect(len(ins) == 2 or ins[1].shape == ins[0].shape, "residual must have x's shape")
    elif node.op == "head_rms_norm":
        expect(ins[1].shape == (a["head_dim"],), "weight must be [head_dim]")
        expect(ins[0].shape[-1] == a["num_heads"] * a["head_dim"], "x must be [T, num_heads*head_dim]")
    elif node.op == "rope":
        expect(ins[0].shape[-1] == a["num_heads"] * a["head_dim"], "q must be [T, num_heads*head_dim]")
        expect(ins[1].shape[-1] == a["num_kv_heads"] * a["head_dim"], "k must be [T, num_kv_heads*head_dim]")
        expect(0 < a["rotary_dim"] <= a["head_dim"] and a["rotary_dim"] % 2 == 0, "rotary_dim must be even, <= head_dim")
        expect(a.get("style", "neox") in ("neox", "gptj"), "style must be neox or gptj")
    elif node.op in ATTENTION_OPS:
        expect(a["num_heads"] % a["num_kv_heads"] == 0, "num_heads must be a multiple of num_kv_heads")
        expect(ins[0].shape[-1] == a["num_heads"] * a["head_dim"], "q must be [T, num_heads*head_dim]")
        expect(tuple(ins[1].shape[2:]) == (a["num_kv_heads"], a["head_dim"]), "k_cache must be [NB, BS, Hk, D]")
        expect(len(ins) == 7 or ins[7].shape == (a["num_heads"],), "sinks must be [num_heads]")
    elif node.op == "kv_cache_write":
        expect(tuple(ins[3].shape[2:]) == (a["num_kv_heads"], a["head_dim"]), "k_cache must be [NB, BS, Hk, D]")
    elif node.op == "qk_norm_rope_cache":
        hq, hk, d = a["num_heads"] * a["head_dim"], a["num_kv_heads"] * a["head_dim"], a["head_dim"]
        expect(ins[0].shape[-1] == hq, "q must be [T, num_heads*head_dim]")
        expect(ins[1].shape[-1] == hk and ins[2].shape[-1] == hk, "k and v must be [T, num_kv_heads*head_dim]")
        expect(all(tuple(c.shape[2:]) == (a["num_kv_heads"], d) for c in ins[5:7]), "caches must be [NB, BS, Hk, D]")
        expect(0 < a["rotary_dim"] <= d and a["rotary_dim"] % 2 == 0, "rotary_dim must be even, <= head_dim")
        expect(a.get("style", "neox") in ("neox", "gptj"), "style must be neox or gptj")
        expect(len(ins) == (9 if a["qk_norm"] else 7), "q_norm and k_norm weights are inputs exactly when qk_norm")
        expect(all(w.shape == (d,) for w in ins[7:]), "q_norm and k_norm weights must be [head_dim]")
        expect(not a["qk_norm"] or "eps" in a, "qk_norm requires attr eps")
    if node.op in KV_CACHE_INPUTS:
        _check_kv_caches(node, ins, expect)
    if node.op in ("moe_experts", "moe_experts_mxfp4", "moe_experts_fp8_block"):
        _check_experts(node, ins, expect)
    elif node.op == "add":
        expect(ins[0].shape == ins[1].shape, "operands must have the same shape")
    elif node.op == "embedding":
        expect(len(ins[1].shape) == 2, "weight must be [vocab, hidden]")
    elif node.op == "logits":
        expect(ins[0].shape[-1] == ins[2].shape[1], "x's hidden must equal weight's")
    elif node.op in ("gated_act", "gated_act_quant", "gated_act_linear_fp8"):
        expect(a["act"] in ("silu", "gelu", "gelu_tanh"), "act must be silu, gelu or gelu_tanh")
    elif node.op in linear_attention.OP_NAMES:
        linear_attention.check(node.op, a, ins, expect)
    elif node.op == "split":
        sizes = a["sizes"]
        expect(isinstance(sizes, (list, tuple)) and len(sizes) >= 1
               and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes),
               f"sizes must be a non-empty list of positive ints; got {sizes!r}")
        expect(len(ins[0].shape) == 2, "x must be [T, N]")
        width = ins[0].shape[-1]
        expect(isinstance(width, int) and sum(sizes) == width, f"sizes {list(sizes)} must sum to x's last dim")
    # FP8 quantization fused into its producer, and the linear reading it (see ops.py)
    if node.op in ("rms_norm_quant", "gated_act_quant"):
        expect(a["fp8_format"] in ("e4m3fn", "e4m3fnuz", "int8"),
               f"fp8_format must be e4m3fn, e4m3fnuz or int8; got {a['fp8_format']!r}")
    if node.op == "gated_act_linear_fp8":
        expect(a["fp8_format"] in ("e4m3fn", "e4m3fnuz"),
               f"fp8_format must be e4m3fn or e4m3fnuz; got {a['fp8_format']!r}")
        expect(isinstance(a["group"], int) and a["group"] >= 0, f"group must be an int >= 0; got {a['group']!r}")
    if node.op == "linear_int8":
        expect(ins[1].dtype == "int8", f"weight must be int8; got {ins[1].dtype}")
        expect(a["weight_scheme"] in ("channel", "tensor"), f"weight_scheme must be channel or tensor; got "
               f"{a['weight_scheme']!r}")
        expect(a["act_scheme"] in ("dynamic_token", "prequantized"), f"act_scheme must be dynamic_token or "
               f"prequantized; got {a['act_scheme']!r}")
    if node.op in ("linear_fp8", "linear_int8") and a["act_scheme"] == "prequantized":
        x_dtype = "int8" if node.op == "linear_int8" else f"float8_{a['fp8_format']}"
        expect(ins[0].dtype == x_dtype, f"prequantized x must be {x_dtype}")
        expect(len(ins) == 4 + bool(a.get("has_bias")),
               "prequantized takes (x_q, weight, weight_scale, x_scale, (bias))")
        expect(ins[3].dtype == "float32" and ins[3].shape[0] == ins[0].shape[0], "x_scale must be float32 [T, G]")
        expect("out_dtype" in a and "group" in a, "prequantized needs attrs out_dtype and group")
    if node.op == "gated_act_linear_fp8":
        expect(a["group"] > 0 and ins[0].shape[1] == 2 * ins[1].shape[1],
               "gate_up must be [T, 2I] for weight [N, I], quantized in groups (group > 0)")


def _check_experts(node: Node, ins: list[TensorSpec], expect) -> None:
    """moe_experts: w13 [E, 2I, H], w2 [E, H, I]; the _mxfp4 form: uint8 blocks [.., K/2] and e8m0 scales
    [.., K/32] of each; biases b13 [E, 2I], b2 [E, H] (rdnac.ir.moe)."""
    from rdnac.ir.moe import ACTS

    expect(node.attrs["act"] in ACTS, f"act must be one of {', '.join(ACTS)}")
    if node.op == "moe_experts":
        num_weights, (e, two_i, h) = 2, ins[3].shape
        expect(ins[4].shape == (e, h, two_i // 2), "w2 must be [E, H, I] for w13 [E, 2I, H]")
    elif node.op == "moe_experts_fp8_block":
        num_weights, (e, two_i, h) = 4, ins[3].shape
        bn, bk = node.attrs["block_size"]
        fmt, i = node.attrs["fp8_format"], two_i // 2
        expect(node.attrs["act_scheme"] in ("dynamic_group", "none"), "act_scheme must be dynamic_group or none")
        expect(ins[3].dtype == ins[5].dtype == f"float8_{fmt}", f"w13 and w2 must be float8_{fmt}")
        expect(ins[4].dtype == ins[6].dtype == "float32", "weight scales must be float32")
        expect(ins[5].shape == (e, h, i), "w2 must be [E, H, I] for w13 [E, 2I, H]")
        expect(ins[4].shape == (e, 2 * -(-i // bn), -(-h // bk)),
               f"w13_scale must be [E, 2*ceil(I/{bn}), ceil(H/{bk})] (gate blocks, then up blocks)")
        expect(ins[6].shape == (e, -(-h // bn), -(-i // bk)), f"w2_scale must be [E, ceil(H/{bn}), ceil(I/{bk})]")
    else:
        num_weights, (e, two_i, half_h) = 4, ins[3].shape
        h, i = 2 * half_h, two_i // 2
        expect(all(s.dtype == "uint8" for s in ins[3:7]), "MXFP4 blocks and scales must be uint8")
        expect(ins[4].shape == (e, two_i, h // 32), "w13_scales must be [E, 2I, H/32] for w13_blocks [E, 2I, H/2]")
        expect(ins[5].shape == (e, h, i // 2) and ins[6].shape == (e, h, i // 32),
               "w2_blocks, w2_scales must be [E, H, I/2], [E, H, I/32]")
    expect(two_i % 2 == 0 and ins[0].shape[-1] == h, "x must be [T, H] and w13 [E, 2I, H]")
    biases = ins[3 + num_weights:]
    expect(not biases or (biases[0].shape == (e, two_i) and biases[1].shape == (e, h)),
           "biases must be b13 [E, 2I] and b2 [E, H]")
