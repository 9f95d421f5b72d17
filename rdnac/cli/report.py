"""`rdnac inspect PLAN --html FILE`: one self-contained HTML page that explains a plan.

The page (templates/report.html.j2, inline CSS, no external assets) shows the
header and model, the fused graph grouped by layer with the nodes a fusion
pass produced highlighted, the kernel and config every node runs at every
step key, each kernel binary's resources, the weights and the decisions that
touched them, the full decision log, the memory budget, and an estimated
decode roofline on the target: at batch 1 a decode step reads every weight
once (an embedding table only one row) plus the KV cache up to the context,
so TPOT >= bytes / HBM bandwidth.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rdnac.ir.graph import Graph
from rdnac.ir.ops import ATTENTION_OPS
from rdnac.plans import Plan, read_plan

TEMPLATES = Path(__file__).parent / "templates"
FUSION_PASS_PREFIXES = ("fuse_", "merge_")  # passes whose decisions name a node they built
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def dtype_bytes(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def is_fusion_pass(name: str) -> bool:
    return name.startswith(FUSION_PASS_PREFIXES)


def config_text(config: dict) -> str:
    consts = " ".join(f"{k}={v}" for k, v in config.get("constexprs", {}).items())
    return f"{consts} w{config.get('num_warps', '?')} s{config.get('num_stages', '?')}".strip()


# ---------------------------------------------------------------- memory and roofline


def kv_bytes_per_token(graph: Graph) -> dict[str, int]:
    """Bytes one token adds to each paged state tensor the plan declares (its K and V caches)."""
    return {s.name: s.nbytes for s in graph.state if s.is_paged}


def decode_weight_bytes(graph: Graph) -> int:
    """Weight bytes one decode step at batch 1 reads: all of each weight, except a table only
    `embedding` reads, of which it gathers one row."""
    readers: dict[str, set[str]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name in graph.weights:
                readers.setdefault(name, set()).add(node.op)
    total = 0
    for name, w in graph.weights.items():
        size = numel(w.shape) * dtype_bytes(w.dtype)
        total += size // w.shape[0] if readers.get(name) == {"embedding"} else size
    return total


def memory_budget(graph: Graph, runtime: dict) -> dict:
    per_cache = kv_bytes_per_token(graph)
    per_token = sum(per_cache.values())
    max_len, block = runtime["max_model_len"], runtime["kv_block_size"]
    return {"weight_bytes": sum(numel(w.shape) * dtype_bytes(w.dtype) for w in graph.weights.values()),
            "num_weights": len(graph.weights), "kv_caches": len(per_cache), "kv_bytes_per_token": per_token,
            "kv_block_size": block, "kv_bytes_per_block": per_token * block, "max_model_len": max_len,
            "kv_bytes_per_sequence": per_token * -(-max_len // block) * block}


def decode_roofline(graph: Graph, runtime: dict, hbm_gbps: float, contexts: list[int] | None = None) -> dict:
    """Estimated decode step at batch 1: bytes read and the TPOT that HBM bandwidth allows."""
    windows = {}  # cache input -> sliding window of the attention reading it (0: full context)
    for node in graph.nodes:
        if node.op in ATTENTION_OPS:
            for name in node.inputs[1:3]:
                windows[name] = node.attrs.get("sliding_window", 0) or 0
    per_cache = kv_bytes_per_token(graph)
    weights = decode_weight_bytes(graph)
    max_len = runtime["max_model_len"]
    contexts = contexts or sorted({1, max(1, max_len // 2), max_len})
    rows = []
    for ctx in contexts:
        kv = sum(b * (min(ctx, windows[n]) if windows.get(n) else ctx) for n, b in per_cache.items())
        row = {"context": ctx, "weight_bytes": weights, "kv_bytes": kv, "bytes": weights + kv}
        if hbm_gbps:
            seconds = (weights + kv) / (hbm_gbps * 1e9)
            row.update(tpot_ms=seconds * 1e3, tokens_per_s=1.0 / seconds)
        rows.append(row)
    return {"hbm_gbps": hbm_gbps, "rows": rows}


# ---------------------------------------------------------------- graph, program, decisions


def _step_spans(choices: dict) -> list[dict]:
    """Consecutive step keys with the same kernel and config, merged: decode T<=1..8 -> one row."""
    spans: list[dict] = []
    for key, c in choices.items():
        phase, bucket = key.split(":")
        label = (c["kernel"], config_text(c["config"]))
        last = spans[-1] if spans else None
        if last and last["phase"] == phase and (last["kernel"], last["config"]) == label:
            last["last"] = bucket
            continue
        spans.append({"phase": phase, "first": bucket, "last": bucket, "kernel": c["kernel"],
                      "config": label[1], "reason": c.get("reason", "")})
    for s in spans:
        s["steps"] = f"{s['phase']} T≤{s['first']}" if s["first"] == s["last"] else \
            f"{s['phase']} T≤{s['first']}…{s['last']}"
    return spans


def _layers(graph: Graph, program: dict, decisions: list[dict]) -> list[dict]:
    fused: dict[str, list[str]] = {}
    for d in decisions:
        if is_fusion_pass(d["pass"]):
            fused.setdefault(d["node"], []).append(f"{d['pass']}: {d['action']}")
    groups: list[dict] = []
    seen_layer = False
    for node in graph.nodes:
        m = _LAYER.search(node.name)
        if m:
            seen_layer = True
            label = f"layer {m.group(1)}"
        else:
            label = "after the layers" if seen_layer else "before the layers"
        if not groups or groups[-1]["label"] != label:
            groups.append({"label": label, "nodes": [], "num_fused": 0})
        entry = {"name": node.name, "op": node.op, "inputs": node.inputs, "outputs": node.outputs,
                 "attrs": ", ".join(f"{k}={v}" for k, v in node.attrs.items()),
                 "fusion": fused.get(node.name, []), "spans": _step_spans(program.get(node.name, {}))}
        groups[-1]["nodes"].append(entry)
        groups[-1]["num_fused"] += bool(entry["fusion"])
    return groups


def _kernels(plan: Plan, lds_bytes: int) -> list[dict]:
    out = []
    for k in plan.body.get("kernels") or []:
        r, call = k["resources"], k["call"]
        out.append({"kernel": k["kernel"].removeprefix("rdnac.kernels."), "key": k["key"],
                    "config": config_text(call), "shared_bytes": r["shared_bytes"],
                    "shared_pct": 100.0 * r["shared_bytes"] / lds_bytes if lds_bytes else None,
                    "registers": r["num_regs"], "spills": r["num_spills"],
                    "matrix_instructions": ", ".join(r["matrix_instructions"]) or "-",
                    "binary_bytes": len(k["binary"]), "binary_ext": k.get("binary_ext", "")})
    return out


def _weights(graph: Graph, decisions: list[dict]) -> list[dict]:
    notes: dict[str, list[str]] = {}
    for d in decisions:
        if d["node"] in graph.weights:
            notes.setdefault(d["node"], []).append(f"{d['pass']}: {d['action']}")
    return [{"name": name, "dtype": w.dtype, "shape": "×".join(map(str, w.shape)), "scheme": w.scheme,
             "source": w.source, "bytes": numel(w.shape) * dtype_bytes(w.dtype), "transforms": notes.get(name, [])}
            for name, w in graph.weights.items()]


def report_data(plan_path: str | Path, contexts: list[int] | None = None) -> dict:
    plan = read_plan(plan_path)
    graph = Graph.from_dict(plan.body["graph"])
    h = plan.header
    target = h.get("target_info") or {}
    decisions = plan.body.get("decisions") or []
    runtime = plan.body["runtime"]
    layers = _layers(graph, plan.body.get("program") or {}, decisions)
    return {
        "plan": str(plan.path), "header": h, "target": target, "model": {**h["model"], **graph.attrs},
        "graph": {"num_nodes": len(graph.nodes), "ops": dict(sorted(graph.op_counts().items())),
                  "inputs": {k: f"{v.dtype} [{', '.join(map(str, v.shape))}]" for k, v in graph.inputs.items()},
                  "outputs": graph.outputs},
        "layers": layers,
        "num_fused_nodes": sum(g["num_fused"] for g in layers),
        "has_program": bool(plan.body.get("program")),
        "kernels": _kernels(plan, target.get("lds_bytes", 0)),
        "weights": _weights(graph, decisions),
        "decisions": decisions,
        "memory": memory_budget(graph, runtime),
        "roofline": decode_roofline(graph, runtime, target.get("hbm_gbps") or 0, contexts),
        "runtime": runtime,
    }


def _size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def render_html(data: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = _size
    return env.get_template("report.html.j2").render(d=data, title=Path(data["plan"]).name)


def write_html(plan_path: str | Path, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.write_text(render_html(report_data(plan_path)), encoding="utf-8")
    return out
