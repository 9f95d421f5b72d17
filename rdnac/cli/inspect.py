"""`rdnac inspect`: a summary of a plan, as a dict (for --json) and as rich text."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rdnac.ir.graph import Graph
from rdnac.plans import read_plan

_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1,
                  "float8_e4m3fn": 1, "float8_e4m3fnuz": 1}


def summarize(plan_path) -> dict:
    plan = read_plan(plan_path)
    graph = Graph.from_dict(plan.body["graph"])
    weight_bytes = 0
    for w in graph.weights.values():
        n = 1
        for d in w.shape:
            n *= d
        weight_bytes += n * _ELEMENT_BYTES.get(w.dtype, 4)
    return {
        "plan": str(plan.path),
        "header": plan.header,
        "model": {**plan.header["model"], **graph.attrs},
        "graph": {"num_nodes": len(graph.nodes), "ops": graph.op_counts(), "inputs": list(graph.inputs),
                  "outputs": graph.outputs},
        "weights": {"count": len(graph.weights), "bytes": weight_bytes,
                    "file": plan.header["weights"]["file"], "file_bytes": plan.header["weights"]["size"]},
        "kernels": [{k: v for k, v in kern.items() if k != "binary"} for kern in plan.body.get("kernels", [])],
        "runtime": plan.body["runtime"],
        "has_chat_template": bool(plan.body.get("chat_template")),
        "decisions": plan.body["decisions"],
    }


def render_text(s: dict, show_decisions: bool = False) -> None:
    console = Console()
    h, m = s["header"], s["model"]
    console.print(f"[bold]{s['plan']}[/bold]  rdnac {h['rdnac_version']}  target [bold]{h['target']}[/bold]")
    console.print(f"model {m['name']} ({m['architecture']}, {m['format']}): {m['num_layers']} layers, hidden "
                  f"{m['hidden_size']}, heads {m['num_heads']}/{m['num_kv_heads']} x {m['head_dim']}, vocab "
                  f"{m['vocab_size']}, dtype {m['dtype']}")
    console.print(f"weights: {s['weights']['count']} tensors, {s['weights']['bytes'] / 2**20:.1f} MiB "
                  f"({s['weights']['file']})   max model len {s['runtime']['max_model_len']}, "
                  f"KV block {s['runtime']['kv_block_size']}")
    table = Table(title=f"graph: {s['graph']['num_nodes']} nodes")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in sorted(s["graph"]["ops"].items(), key=lambda kv: -kv[1]):
        table.add_row(op, str(n))
    console.print(table)
    if s["kernels"]:
        kt = Table(title=f"kernels: {len(s['kernels'])}")
        for col in ("name", "config", "shared", "registers", "spills", "matrix"):
            kt.add_column(col)
        for k in s["kernels"]:
            r = k.get("resources", {})
            kt.add_row(str(k.get("name")), str(k.get("config", "")), str(r.get("shared", "")),
                       str(r.get("registers", "")), str(r.get("spills", "")), ",".join(r.get("matrix", []) or []))
        console.print(kt)
    console.print(f"decision log: {len(s['decisions'])} entries" + ("" if show_decisions else " (--decisions to list)"))
    if show_decisions:
        for d in s["decisions"]:
            line = f"  [{d['pass']}] {d['node']}: {d['action']}" + (f" — {d['reason']}" if d["reason"] else "")
            console.print(escape(line), soft_wrap=True)
