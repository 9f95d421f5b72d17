"""Decode measurement on the GPU: copy bandwidth, seconds per decode step, and the bytes a step reads.

Achieved bandwidth is bytes read per step / TPOT: every weight the step
reads plus the model state (`Graph.state`, e.g. the paged KV cache) of
`context` tokens per sequence, against the device's copy bandwidth. A MoE
layer's experts count only as far as the step's tokens route to them
(`_unrouted_expert_bytes`).
"""

from __future__ import annotations

import time

import torch

from rdnac.ir.state import bytes_per_token
from rdnac.runtime.model_runner import StepEntry


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write of a 1 GiB buffer, 10 times)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - start) / 1e9  # read + write, GB/s


def tpot(llm, batch: int, context: int, steps: int = 50) -> float:
    """Seconds per decode step for `batch` sequences at `context` tokens (KV already allocated)."""
    per_seq = -(-(context + 1) // llm.runner.block_size)
    entries = []
    for _ in range(batch):
        blocks = llm.engine.block_manager.take_blocks(per_seq)
        entries.append(StepEntry([1] * (context + 1), blocks, context, context + 1))
    for _ in range(5):
        llm.runner.execute(entries)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        llm.runner.execute(entries)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    for e in entries:
        llm.engine.block_manager.free(e.block_table)
    return seconds


def decode_bytes(llm, batch: int, context: int) -> int:
    """Bytes one decode step reads: every weight but the embedding table (only `batch` rows of it are
    read, unless the logits reuse it), plus the declared state of `context` tokens per sequence."""
    graph = llm.graph
    logits_weights = {n.inputs[2] for n in graph.nodes if n.op == "logits"}
    embed = {n.inputs[1] for n in graph.nodes if n.op == "embedding"} - logits_weights
    total = sum(t.numel() * t.element_size() for k, t in llm.weights.items() if k not in embed)
    total += sum(batch * llm.weights[k].shape[1] * llm.weights[k].element_size() for k in embed)
    total -= _unrouted_expert_bytes(graph, llm.weights, batch)
    return total + batch * context * bytes_per_token(graph.state)  # the declared state a step reads


def _unrouted_expert_bytes(graph, weights: dict, batch: int) -> int:
    """Bytes of the experts a decode step of `batch` tokens does not read: each MoE node reads the experts
    its tokens are routed to, E * (1 - (1 - k/E)**batch) of E expected under uniform routing (exactly k at
    batch 1). Its per-expert inputs (weights, MXFP4 or FP8 block scales, biases: all [E, ...]) follow its ids
    input."""
    from rdnac.ir.moe import EXPERT_OPS, expected_active_experts

    top_k = {out: n.attrs["top_k"] for n in graph.nodes if n.op == "moe_route" for out in n.outputs}
    unread = 0.0
    for node in graph.nodes:
        if node.op in EXPERT_OPS:
            per_expert = [weights[name] for name in node.inputs[3:]]  # [E, ...] each (FP8 block: and its scales)
            num_experts = per_expert[0].shape[0]
            active = expected_active_experts(batch, top_k[node.inputs[2]], num_experts)
            unread += sum(t.numel() * t.element_size() for t in per_expert) * (1 - active / num_experts)
    return int(unread)


def decode_record(llm, batch: int, context: int, copy_gbps: float) -> dict:
    """One BENCHMARKS.md decode row: TPOT, tokens/s and achieved bandwidth at `batch` x `context`."""
    t = tpot(llm, batch, context)
    read = decode_bytes(llm, batch, context)
    return {"batch": batch, "context": context, "tpot_ms": round(t * 1e3, 3), "tokens_per_s": round(batch / t, 1),
            "bytes_read_GB": round(read / 1e9, 3), "achieved_GBps": round(read / t / 1e9, 1),
            "pct_of_copy": round(100 * read / t / 1e9 / copy_gbps, 1), "copy_GBps": round(copy_gbps, 1),
            "plan_pdl": llm.plan.body["runtime"].get("pdl", False)}
