"""`rdnac inspect`'s MoE section: per MoE node, what one token costs at batch 1 and what runs it.

For each `moe_experts(_mxfp4)` node: experts and top-k, the bytes a token reads at batch 1 (its k
experts' weights, MXFP4 scales and biases: active experts only), and at decode T=1 the tile chosen
with its two grouped GEMMs' LDS, VGPRs, spills and matrix instructions (the plan's binaries whose
specialization is that node's). Part of `rdnac.cli.inspect.summarize` and `render_text`.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

MOE_OPS = ("moe_experts", "moe_experts_mxfp4")
_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}


def moe_summary(graph, program: dict, kernels: list[dict]) -> list[dict]:
    """One dict per MoE node of `graph`; `program` and `kernels` as the plan body holds them."""
    top_k = {out: n.attrs["top_k"] for n in graph.nodes if n.op == "moe_route" for out in n.outputs}
    out = []
    for node in (n for n in graph.nodes if n.op in MOE_OPS):
        specs = [graph.weights[name] for name in node.inputs[3:]]  # [E, ...] each
        num_experts = specs[0].shape[0]
        per_expert = sum(math.prod(s.shape) * _ELEMENT_BYTES[s.dtype] for s in specs) // num_experts
        k = top_k.get(node.inputs[2])
        entry = {"node": node.name, "op": node.op, "experts": num_experts, "top_k": k,
                 "bytes_per_token_batch1": None if k is None else k * per_expert}
        choice = program.get(node.name, {}).get("decode:1")
        if choice is not None:
            cfg = choice["config"]
            is_mxfp4 = node.op == "moe_experts_mxfp4"
            want = {**cfg["constexprs"], "MXFP4": is_mxfp4, "ACT": node.attrs["act"],
                    "HAS_BIAS": len(node.inputs) == (9 if is_mxfp4 else 7)}
            gemms = {}
            for kb in kernels:
                call = kb["call"]
                if (kb["kernel"].endswith(":_moe_gemm_kernel") and call["num_warps"] == cfg["num_warps"]
                        and call["num_stages"] == cfg["num_stages"]
                        and all(call["constexprs"].get(c) == v for c, v in want.items())):
                    r = kb["resources"]
                    gemms["gate_up" if call["constexprs"]["GATED"] else "down"] = {
                        "shared_bytes": r["shared_bytes"], "registers": r["num_regs"], "spills": r["num_spills"],
                        "matrix_instructions": list(r["matrix_instructions"])}
            entry["decode"] = {"kernel": choice["kernel"], "config": cfg, "gemms": gemms}
        out.append(entry)
    return out


def render_moe(console: Console, moe: list[dict]) -> None:
    table = Table(title=f"MoE: {len(moe)} nodes (decode T=1; bytes a token reads at batch 1, active experts only)")
    for col in ("node", "experts", "tile", "gate/up: LDS, VGPRs, matrix", "down: LDS, VGPRs, matrix", "bytes/token"):
        table.add_column(col, overflow="fold")
    for e in moe:
        d = e.get("decode") or {}
        c = d.get("config")
        tile = "-" if c is None else (" ".join(f"{k}={v}" for k, v in c["constexprs"].items())
                                      + f" w{c['num_warps']} s{c['num_stages']}")
        cells = []
        for which in ("gate_up", "down"):
            g = d.get("gemms", {}).get(which)
            cells.append("-" if g is None else f"{g['shared_bytes']} B, {g['registers']}"
                         + (f" ({g['spills']} spilled)" if g["spills"] else "") + ", "
                         + (", ".join(g["matrix_instructions"]) or "-"))
        nbytes = e["bytes_per_token_batch1"]
        table.add_row(e["node"], f"{e['top_k']} of {e['experts']}" + (" mxfp4" if e["op"].endswith("mxfp4") else ""),
                      tile, *cells, "-" if nbytes is None else f"{nbytes / 1e6:.2f} MB")
    console.print(table)
