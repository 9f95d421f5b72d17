"""Per-node kernel breakdown of one batch-1 decode or prefill step (torch.profiler), for bench/harness.py.

The step runs eagerly once with the launcher wrapped, which records the
(node, kernel) sequence of its launches; a second eager step runs under
torch.profiler, whose CUDA kernel events come in the same order. Each node
gets its kernels' device time, the bytes its weights (and, for attention, the
KV cache) take, and the bandwidth that implies against the copy bandwidth.
The graph replay TPOT minus the summed kernel time is the time between
kernels (launch gaps inside the graph, host work).
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from rdnac.kernels.launch import kernel_name
from rdnac.runtime.engine import StepEntry


def _entries(engine, context: int, prefill: int, batch: int = 1) -> list[StepEntry]:
    """`batch` sequences at a decode step at `context` cached tokens, or one prefill of `prefill` tokens."""
    total = prefill or context + 1
    per_seq = -(-total // engine.block_size)
    engine._ensure_cache(batch * per_seq + 1)
    ids = [(7 * i) % 50000 + 300 for i in range(total)]
    if prefill:
        return [StepEntry(ids, engine._cache.allocator.allocate(per_seq), 0, prefill)]
    return [StepEntry(ids, engine._cache.allocator.allocate(per_seq), context, context + 1) for _ in range(batch)]


def _node_bytes(engine, node, context: int) -> int:
    w = engine.weights
    if node.op in ("linear", "linear_fp8", "linear_gated_act"):
        return sum(w[n].numel() * w[n].element_size() for n in node.inputs if n in w)
    if node.op == "logits":
        return w[node.inputs[2]].numel() * w[node.inputs[2]].element_size()
    if node.op == "attention":
        a = node.attrs
        return 2 * context * a["num_kv_heads"] * a["head_dim"] * engine._dtype.itemsize
    if node.op == "qk_norm_rope_cache":
        return 0
    return 0


def kernel_breakdown(engine, context: int, copy_gbps: float, prefill: int = 0,
                     batch: int = 1) -> tuple[list[dict], dict]:
    """Per-node kernel times of a decode step of `batch` sequences at `context`, or of a `prefill`-token prefill."""
    entries = _entries(engine, context, prefill, batch)
    executor, launcher = engine._executor, engine._executor.launcher
    sequence: list[tuple[str, str]] = []
    current = {"node": None}
    original_run, original_launch = executor.run, launcher.launch

    def run(env, meta, on_node=None):
        return original_run(env, meta, on_node=lambda node: current.update(node=node))

    def launch(kernel, grid, args, **kw):
        sequence.append((current["node"], kernel_name(kernel).split(":")[1]))
        return original_launch(kernel, grid, args, **kw)

    eager = engine.enforce_eager
    engine.enforce_eager, graphs = True, engine._graphs
    engine._graphs = None
    try:
        executor.run, launcher.launch = run, launch
        engine.execute(entries)
        torch.cuda.synchronize()
        executor.run, launcher.launch = original_run, original_launch
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.execute(entries)
            torch.cuda.synchronize()
    finally:
        executor.run, launcher.launch = original_run, original_launch
        engine.enforce_eager, engine._graphs = eager, graphs
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    kernels = [e for e in events if not e.name.startswith(("Memcpy", "Memset", "void at::", "at::"))]
    rows: dict[str, dict] = {}
    i = 0
    for node, name in sequence:
        while i < len(kernels) and not kernels[i].name.startswith(name):
            i += 1  # a torch kernel (input staging) between ours
        if i == len(kernels):
            raise RuntimeError(f"profile: kernel {name} of node {node.name} not found in the trace")
        row = rows.setdefault(node.name, {"node": node.name, "op": node.op, "kernels": [], "us": 0.0,
                                          "bytes": _node_bytes(engine, node, context)})
        row["kernels"].append(name)
        row["us"] += kernels[i].device_time
        i += 1
    for row in rows.values():
        if row["bytes"]:
            row["GBps"] = round(row["bytes"] / row["us"] / 1e3, 1)
            row["pct_of_copy"] = round(100 * row["bytes"] / row["us"] / 1e3 / copy_gbps, 1)
    by_op: dict[str, dict] = {}
    for row in rows.values():
        agg = by_op.setdefault(row["op"], {"us": 0.0, "bytes": 0, "launches": 0})
        agg["us"] += row["us"]
        agg["bytes"] += row["bytes"]
        agg["launches"] += len(row["kernels"])
    total_us = sum(r["us"] for r in rows.values())
    for agg in by_op.values():
        agg["share"] = round(agg["us"] / total_us, 3)
        agg["us"] = round(agg["us"], 1)
        if agg["bytes"]:
            agg["pct_of_copy"] = round(100 * agg["bytes"] / agg["us"] / 1e3 / copy_gbps, 1)
    for entry in entries:
        engine._cache.allocator.free(entry.block_table)
    summary = {"kernel_us_total": round(total_us, 1), "launches": len(sequence), "by_op": by_op}
    return list(rows.values()), summary
