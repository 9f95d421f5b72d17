"""`rdnac inspect`'s MoE section: per MoE node, what one token costs at batch 1 and what runs it.

For each `moe_experts(_mxfp4, _fp8_block)` node: experts and top-k, how they are stored, the bytes a
token reads at batch 1 (its k experts' weights, MXFP4 or FP8 block scales and biases: active experts
only), and at decode T=1 the tile chosen
with its two grouped GEMMs' LDS, VGPRs, spills and matrix instructions (the plan's binaries whose
specialization is that node's). Part of `rdnac.cli.inspect.summarize` and `render_text`.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from rdnac.ir.moe import routed_experts

_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "uint8": 1,
                  "float8_e4m3fn": 1, "float8_e4m3fnuz": 1}

def moe_summary(graph, program: dict | None = None, kernels: list[dict] = ()) -> list[dict]:
    """One dict per MoE experts node of `graph`: its experts, top-k, scoring and activation, the bytes of
    its expert weights (all experts, and the top-k a token reads: weights, MXFP4 scales and biases) and,
    for GPU plans (`program` and `kernels` as the plan body holds them), its decode tile and resources."""
    out = []
    for r in routed_experts(graph):
        node, route, num_experts = r["node"], r["route"], r["num_experts"]
        expert_bytes = sum(nbytes(graph.weights[name]) for name in r["weights"])
        entry = {"node": node.name, "op": node.op, "num_experts": num_experts, "top_k": r["top_k"],
                 "scoring": route["scoring"], "renormalize": bool(route.get("renormalize")),
                 "act": node.attrs["act"], "weight_format": _weight_format(node), "expert_bytes": expert_bytes,
                 "active_expert_bytes": expert_bytes * r["top_k"] // num_experts}
        choice = (program or {}).get(node.name, {}).get("decode:1")
        if choice is not None:
            entry["decode"] = {"kernel": choice["kernel"], "config": choice["config"],
                               "gemms": _decode_gemms(node, choice["config"], kernels)}
        out.append(entry)
    return out


def nbytes(spec) -> int:
    """Bytes of a weight or state spec (shared with rdnac.cli.inspect)."""
    return math.prod(spec.shape) * _ELEMENT_BYTES[spec.dtype]


def _weight_format(node) -> str:
    """How the node's expert weights are stored: "bf16"-like float, "mxfp4", or "fp8-block128x128 e4m3fn(uz)"
    with its activations (w8a8, or a16w8 where the target has no FP8 dot)."""
    if node.op == "moe_experts_mxfp4":
        return "mxfp4"
    if node.op == "moe_experts_fp8_block":
        a = node.attrs
        return (f"fp8-block{a['block_size'][0]}x{a['block_size'][1]} {a['fp8_format']}, "
                + ("a16w8" if a["act_scheme"] == "none" else "w8a8"))
    return "dense"


def _decode_gemms(node, cfg: dict, kernels) -> dict:
    """The two grouped GEMM binaries (gate/up, down) of the node's decode tile: their LDS, VGPRs, spills
    and matrix instructions."""
    is_mxfp4 = node.op == "moe_experts_mxfp4"
    c = cfg["constexprs"]
    is_gemv = is_mxfp4 and c.get("GEMV", False)  # moe_gemv._moe_gemv_mxfp4_kernel: no MXFP4 flag, no matrix
    want = {**{k: v for k, v in c.items() if k not in ("GEMV", "DEQUANT")}, "ACT": node.attrs["act"],
            "HAS_BIAS": len(node.inputs) == (9 if is_mxfp4 else 7)}
    if not is_gemv:
        want["MXFP4"] = is_mxfp4 and not c.get("DEQUANT", False)
    suffix = ":_moe_gemv_mxfp4_kernel" if is_gemv else ":_moe_gemm_kernel"
    if node.op == "moe_experts_fp8_block":  # moe_fp8._moe_fp8_block_gemm_kernel: no bias, no MXFP4 flag
        want = {**c, "ACT": node.attrs["act"], "IS_A16": node.attrs["act_scheme"] == "none"}
        suffix = ":_moe_fp8_block_gemm_kernel"
    gemms = {}
    for kb in kernels:
        call = kb["call"]
        if (kb["kernel"].endswith(suffix) and call["num_warps"] == cfg["num_warps"]
                and call["num_stages"] == cfg["num_stages"]
                and all(call["constexprs"].get(c) == v for c, v in want.items())):
            r = kb["resources"]
            gemms["gate_up" if call["constexprs"]["GATED"] else "down"] = {
                "shared_bytes": r["shared_bytes"], "registers": r["num_regs"], "spills": r["num_spills"],
                "matrix_instructions": list(r["matrix_instructions"])}
    return gemms


def render_moe(console: Console, moe: list[dict]) -> None:
    table = Table(title=f"mixture of experts: {len(moe)} layers (a token reads its top-k experts; GPU plans: the "
                        "decode T=1 tile)")
    for col in ("node", "experts", "routing", "read per token", "tile", "gate/up: LDS, VGPRs, matrix",
                "down: LDS, VGPRs, matrix"):
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
        routing = e["scoring"] + (" renormalized" if e["renormalize"] else "") + f", {e['act']}"
        fmt = "" if e["weight_format"] == "dense" else f" {e['weight_format']}"
        table.add_row(e["node"], f"{e['top_k']} of {e['num_experts']}{fmt}",
                      routing, f"{e['active_expert_bytes'] / 1e6:.2f} of {e['expert_bytes'] / 1e6:.2f} MB", tile,
                      *cells)
    console.print(table)
