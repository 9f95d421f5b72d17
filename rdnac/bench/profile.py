"""Where a step's time goes (GPU): per-node kernel breakdown and graph-replay timeline (torch.profiler).

The step runs eagerly once with the launcher wrapped, which records the
(node, kernel) sequence of its launches; a second eager step runs under
torch.profiler, whose CUDA kernel events come in the same order. Each node
gets its kernels' device time, the bytes its weights (and, for attention, the
KV cache) take, and the bandwidth that implies against the copy bandwidth.
The graph replay TPOT minus the summed kernel time is the time between
kernels (launch gaps inside the graph, host work).
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import ProfilerActivity, profile

from rdnac.ir.ops import ATTENTION_OPS
from rdnac.kernels.launch import kernel_name
from rdnac.bench.decode import _unread_weight_bytes, release, take_entries
from rdnac.runtime.model_runner import StepEntry


def _entries(engine, context: int, prefill: int, batch: int = 1) -> list[StepEntry]:
    """`batch` sequences at a decode step at `context` cached tokens, or one prefill of `prefill` tokens
    (each with a state slot where the plan keeps per-sequence state; `release` frees both)."""
    total = prefill or context + 1
    ids = [((7 * i) % 50000 + 300) % engine.graph.attrs["vocab_size"] for i in range(total)]
    start = 0 if prefill else context
    return [StepEntry(ids, e.block_table, start, total, e.state_slot)
            for e in take_entries(engine, 1 if prefill else batch, total)]


def _node_bytes(engine, node, context: int, sequences: int = 1, tokens: int | None = None) -> int:
    """Bytes `node` reads in a step of `sequences` sequences and `tokens` tokens (default: one each, decode)."""
    w = engine.weights
    if node.op in ("linear", "linear_fp8", "linear_int8", "linear_gated_act", "gated_act_linear_fp8"):
        return sum(w[n].numel() * w[n].element_size() for n in node.inputs if n in w)
    if node.op == "logits":
        return w[node.inputs[2]].numel() * w[node.inputs[2]].element_size()
    if node.op in ATTENTION_OPS:  # the declared state its cache inputs hold, `context` tokens of it
        return context * sum(s.nbytes for s in engine.graph.state if s.is_paged and s.name in node.inputs)
    if node.op == "mla_attention":  # the latent cache of `context` tokens and kv_b_proj in the decode form
        latent = context * sum(s.nbytes for s in engine.graph.state if s.is_paged and s.name in node.inputs)
        form = node.inputs[7:9] if node.attrs.get("decode_form") == "absorbed" else node.inputs[6:7]
        return latent + sum(w[n].numel() * w[n].element_size() for n in form)
    if node.op in ("gated_delta_rule", "causal_conv1d"):  # its per-sequence state, read and written
        return 2 * sequences * sum(s.nbytes for s in engine.graph.state if not s.is_paged and s.name in node.inputs)
    if node.op in ("moe_experts", "moe_experts_mxfp4"):  # the experts the step's tokens are expected to read
        unread = _unread_weight_bytes(engine.graph, w, tokens or sequences)
        return int(sum(w[n].numel() * w[n].element_size() - unread.get(n, 0) for n in node.inputs[3:] if n in w))
    return 0  # the small kernels: their bytes are not counted


def _launch_sequence(engine, entries) -> list[tuple]:
    """(node, kernel name) of each launch of one eager step over `entries`, in launch order (the order a
    captured graph of the same step holds them in)."""
    executor, launcher = engine.runner._executor, engine.runner._executor.launcher
    sequence: list[tuple] = []
    current = {"node": None}
    original_run, original_launch = executor.run, launcher.launch

    def run(env, meta, on_node=None):
        return original_run(env, meta, on_node=lambda node: current.update(node=node))

    def launch(kernel, grid, args, **kw):
        sequence.append((current["node"], kernel_name(kernel).split(":")[1]))
        return original_launch(kernel, grid, args, **kw)

    with _eager(engine):
        try:
            executor.run, launcher.launch = run, launch
            engine.runner.execute(entries)
            torch.cuda.synchronize()
        finally:
            executor.run, launcher.launch = original_run, original_launch
    return sequence


@contextlib.contextmanager
def _eager(engine):
    eager, graphs = engine.runner.enforce_eager, engine.runner.graphs
    engine.runner.enforce_eager, engine.runner.graphs = True, None
    try:
        yield
    finally:
        engine.runner.enforce_eager, engine.runner.graphs = eager, graphs


def _profiled_kernels(step) -> list:
    """CUDA kernel events of `step()` under torch.profiler, by start time (torch's own copies left out)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    return [e for e in events if not e.name.startswith(("Memcpy", "Memset", "void at::", "at::"))]


def _match(sequence: list[tuple], kernels: list) -> list[tuple]:
    """(node, kernel name, event) for each launch of `sequence`, found in order among `kernels`."""
    matched, i = [], 0
    for node, name in sequence:
        while i < len(kernels) and not kernels[i].name.startswith(name):
            i += 1  # a torch kernel (input staging) between ours
        if i == len(kernels):
            raise RuntimeError(f"profile: kernel {name} of node {node.name} not found in the trace")
        matched.append((node, name, kernels[i]))
        i += 1
    return matched


def kernel_breakdown(engine, context: int, copy_gbps: float, prefill: int = 0,
                     batch: int = 1) -> tuple[list[dict], dict]:
    """Per-node kernel times of a decode step of `batch` sequences at `context`, or of a `prefill`-token prefill."""
    entries = _entries(engine, context, prefill, batch)
    sequence = _launch_sequence(engine, entries)
    with _eager(engine):
        kernels = _profiled_kernels(lambda: engine.runner.execute(entries))
    rows: dict[str, dict] = {}
    for node, name, event in _match(sequence, kernels):
        row = rows.setdefault(node.name, {"node": node.name, "op": node.op, "kernels": [], "us": 0.0,
                                          "bytes": _node_bytes(engine, node, context, len(entries),
                                                               sum(e.end - e.start for e in entries))})
        row["kernels"].append(name)
        row["us"] += event.device_time
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
    release(engine, entries)
    summary = {"kernel_us_total": round(total_us, 1), "launches": len(sequence), "by_op": by_op}
    return list(rows.values()), summary


def graph_timeline(engine, context: int, batch: int = 1, replays: int = 3) -> tuple[list[dict], dict]:
    """Each kernel of a captured decode graph's replay (`batch` sequences at `context`), as it ran with
    PDL: its duration, how far it started before the previous kernel ended ("early_us", > 0 when it was
    launched early and waited), and how far it moved the step's end ("advance_us": how far its end
    passes the latest end before it, see `timeline_rows`). The advances sum to the replay's span (the first kernel's start to the last
    end), so they say where the step's time goes when kernels overlap, which the eager breakdown cannot."""
    if engine.runner.graphs is None or engine.runner.graphs.bucket_for(batch) is None:
        raise RuntimeError(f"graph_timeline: the engine has no captured decode graph for batch {batch}")
    entries = _entries(engine, context, 0, batch)
    sequence = _launch_sequence(engine, entries)
    for _ in range(replays):  # warm: the replay under the profiler is a steady-state one
        engine.runner.execute(entries)
    torch.cuda.synchronize()
    kernels = _profiled_kernels(lambda: engine.runner.execute(entries))
    timed = [(node, name, event.time_range.start, event.time_range.end)
             for node, name, event in _match(sequence, kernels)]
    rows, by_op = timeline_rows(timed)
    release(engine, entries)
    span = max(end for *_, end in timed) - timed[0][2]
    return rows, {"batch": batch, "span_us": round(span, 1), "launches": len(rows), "by_op": by_op}


def timeline_rows(kernels: list[tuple]) -> tuple[list[dict], dict]:
    """Per kernel (node, kernel name, start us, end us), in launch order: its row (duration, early start,
    advance) and the per-op sums. A kernel's advance is how far its end passes the latest end before it
    (0 if it does not), so the advances sum to the last end minus the first start, however kernels overlap."""
    rows, by_op = [], {}
    prev_end = kernels[0][2]
    for node, name, start, end in kernels:
        advance = max(end - prev_end, 0.0)  # a kernel ending inside an earlier one adds nothing
        rows.append({"node": node.name, "op": node.op, "kernel": name, "dur_us": round(end - start, 2),
                     "early_us": round(prev_end - start, 2), "advance_us": round(advance, 2)})
        agg = by_op.setdefault(node.op, {"advance_us": 0.0, "dur_us": 0.0, "launches": 0})
        agg["advance_us"] += advance
        agg["dur_us"] += end - start
        agg["launches"] += 1
        prev_end = max(prev_end, end)
    for agg in by_op.values():
        agg["advance_us"], agg["dur_us"] = round(agg["advance_us"], 1), round(agg["dur_us"], 1)
    return rows, by_op
