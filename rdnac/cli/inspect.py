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
        "kernels": [_kernel_summary(k) for k in plan.body.get("kernels", [])],
        "program": _program_summary(plan.body.get("program") or {}),
        "runtime": plan.body["runtime"],
        "has_chat_template": bool(plan.body.get("chat_template")),
        "decisions": plan.body["decisions"],
    }


def _kernel_summary(k: dict) -> dict:
    r, call = k["resources"], k["call"]
    return {"kernel": k["kernel"], "key": k["key"], "target": k["target"], "triton_version": k["triton_version"],
            "constexprs": call["constexprs"], "num_warps": call["num_warps"], "num_stages": call["num_stages"],
            "shared_bytes": r["shared_bytes"], "registers": r["num_regs"], "spills": r["num_spills"],
            "matrix_instructions": r["matrix_instructions"], "binary_bytes": len(k["binary"]), "sha256": k["sha256"]}


def _program_summary(program: dict) -> list[dict]:
    """Per node: the wrapper and config chosen at the smallest decode step and the largest prefill step."""
    out = []
    for node, choices in program.items():
        decode = [k for k in choices if k.startswith("decode:")]
        prefill = [k for k in choices if k.startswith("prefill:")]
        entry = {"node": node}
        for label, keys in (("decode", decode[:1]), ("prefill", prefill[-1:])):
            if keys:
                c = choices[keys[0]]
                entry[label] = {"step": keys[0], "kernel": c["kernel"], "config": c["config"]}
        out.append(entry)
    return out


def _config_text(c: dict) -> str:
    consts = " ".join(f"{k}={v}" for k, v in c["constexprs"].items())
    return f"{consts} w{c['num_warps']} s{c['num_stages']}"


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
    if s["program"]:
        pt = Table(title="program (node: kernel and config at decode T=1 / largest prefill step)")
        for col in ("node", "kernel", "decode config", "prefill config"):
            pt.add_column(col, overflow="fold")
        for e in s["program"]:
            d, p = e.get("decode"), e.get("prefill")
            pt.add_row(e["node"], (d or p)["kernel"].replace("_decode", "_*") if d and p and d["kernel"] != p["kernel"]
                       else (d or p)["kernel"], _config_text(d["config"]) if d else "-",
                       _config_text(p["config"]) if p else "-")
        console.print(pt)
    if s["kernels"]:
        kt = Table(title=f"kernels: {len(s['kernels'])} binaries for {h['target']} (Triton {h['triton_version']})")
        for col in ("kernel", "config", "shared", "regs", "spills", "matrix instructions"):
            kt.add_column(col, overflow="fold")
        for k in s["kernels"]:
            kt.add_row(k["kernel"].removeprefix("rdnac.kernels."), _config_text(k), str(k["shared_bytes"]),
                       str(k["registers"]), str(k["spills"]), ", ".join(k["matrix_instructions"]) or "-")
        console.print(kt)
    console.print(f"decision log: {len(s['decisions'])} entries" + ("" if show_decisions else " (--decisions to list)"))
    if show_decisions:
        for d in s["decisions"]:
            line = f"  [{d['pass']}] {d['node']}: {d['action']}" + (f" — {d['reason']}" if d["reason"] else "")
            console.print(escape(line), soft_wrap=True)
