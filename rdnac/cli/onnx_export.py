"""`rdnac inspect PLAN --onnx FILE`: the plan's fused graph as an ONNX model, for Netron.

For viewing, not for running: one ONNX node per IR node, in the custom
domain `ai.rdnac` with the IR op name as op_type and the node's attrs as
attributes (dicts and None JSON-encoded). The runtime inputs are graph
inputs with symbolic dims (T, B, NB...); weights are graph inputs too,
typed and shaped but with no data, so the file stays small. Every value
carries its type and shape from the ops' shape rules.

`kv_cache_write` and `qk_norm_rope_cache` update their caches in place
(`OpDef.in_place`); ONNX values are written once, so the updated caches are
extra outputs with new names (`k_cache.0.written`) and later readers of a
cache read those, which shows the write -> attention edge.
"""

from __future__ import annotations

import json
from pathlib import Path

from rdnac.errors import RdnacError
from rdnac.ir.graph import Graph, TensorSpec
from rdnac.ir.ops import OPS
from rdnac.plans import read_plan

DOMAIN = "ai.rdnac"
DOMAIN_VERSION = 1


def _elem_type(dtype: str) -> int:
    from onnx import TensorProto

    names = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16", "float64": "DOUBLE",
             "int64": "INT64", "int32": "INT32", "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
             "float8_e4m3fn": "FLOAT8E4M3FN", "float8_e4m3fnuz": "FLOAT8E4M3FNUZ", "float8_e5m2": "FLOAT8E5M2"}
    if dtype not in names:
        raise RdnacError(f"ONNX export requires a dtype ONNX can name; got {dtype!r}")
    return getattr(TensorProto, names[dtype])


def _value_info(name: str, spec: TensorSpec):
    from onnx import helper

    return helper.make_tensor_value_info(name, _elem_type(spec.dtype), list(spec.shape))


def _attribute(key: str, value):
    """An IR attr as an ONNX attribute: ints, floats, strings and homogeneous lists of them
    as themselves; bools as ints; dicts, None and mixed lists as JSON strings."""
    from onnx import helper

    if isinstance(value, bool):
        value = int(value)
    elif isinstance(value, (list, tuple)):
        value = list(value)
        kinds = {type(v) for v in value}
        if not value or not (kinds <= {int} or kinds <= {int, float} or kinds <= {str}):
            value = json.dumps(value)
        elif kinds == {int, float}:
            value = [float(v) for v in value]
    elif value is None or isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    return helper.make_attribute(key, value)


def graph_to_onnx(graph: Graph, name: str = "rdnac", metadata: dict | None = None,
                  notes: dict[str, list[str]] | None = None):
    """An `onnx.ModelProto` of `graph` (no weight data); passes `onnx.checker.check_model`.

    `notes` (node name -> lines, e.g. its decision-log entries) become the nodes' doc strings."""
    import onnx
    from onnx import helper

    specs: dict[str, TensorSpec] = {**graph.inputs,
                                    **{k: TensorSpec(w.dtype, w.shape) for k, w in graph.weights.items()}}
    current = {n: n for n in specs}  # IR value name -> the ONNX name of its latest version
    nodes, value_info = [], []
    for node in graph.nodes:
        inputs = [current[n] for n in node.inputs]
        out_specs = OPS[node.op].infer(node.attrs, [specs[n] for n in node.inputs])
        outputs = list(node.outputs)
        written = [node.inputs[i] for i in OPS[node.op].in_place]  # in place (KV caches): name the updated values
        out_specs = out_specs + [specs[n] for n in written]
        outputs += [f"{n}.written" for n in written]
        for ir_name in written:
            current[ir_name] = f"{ir_name}.written"
        for out, spec in zip(outputs, out_specs):
            specs[out] = spec
            value_info.append(_value_info(out, spec))
        for out in node.outputs:
            current[out] = out
        attrs = [_attribute(k, v) for k, v in node.attrs.items()]
        onnx_node = helper.make_node(node.op, inputs, outputs, name=node.name, domain=DOMAIN,
                                     doc_string="\n".join((notes or {}).get(node.name, [])) or None)
        onnx_node.attribute.extend(attrs)
        nodes.append(onnx_node)
    outputs = [_value_info(n, specs[n]) for n in graph.outputs]
    value_info = [v for v in value_info if v.name not in set(graph.outputs)]
    inputs = [_value_info(n, s) for n, s in graph.inputs.items()]
    inputs += [_value_info(n, TensorSpec(w.dtype, w.shape)) for n, w in graph.weights.items()]
    onnx_graph = helper.make_graph(nodes, name, inputs, outputs, value_info=value_info,
                                   doc_string="rdnac plan graph; weights are inputs without data")
    model = helper.make_model(onnx_graph, producer_name="rdnac",
                              opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version()),
                                             helper.make_opsetid(DOMAIN, DOMAIN_VERSION)])
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, default=str)
    return model


def export_onnx(plan_path: str | Path, out_path: str | Path) -> Path:
    import onnx

    plan = read_plan(plan_path)
    graph = Graph.from_dict(plan.body["graph"])
    h = plan.header
    meta = {"target": h["target"], "rdnac_version": h["rdnac_version"], "model": h["model"]["name"],
            "architecture": h["model"]["architecture"], "graph_attrs": graph.attrs}
    notes: dict[str, list[str]] = {}
    for d in plan.body.get("decisions") or []:
        line = f"[{d['pass']}] {d['action']}" + (f": {d['reason']}" if d["reason"] else "")
        notes.setdefault(d["node"], []).append(line)
    model = graph_to_onnx(graph, name=h["model"]["name"], metadata=meta, notes=notes)
    onnx.checker.check_model(model)
    out = Path(out_path)
    onnx.save(model, str(out))
    return out
