"""Decode measurement on the GPU: copy bandwidth, seconds per decode step, and the bytes a step reads.

Achieved bandwidth is bytes read per step / TPOT: every weight the step
reads plus the model state (`Graph.state`: the paged KV or MLA latent cache
of `context` tokens per sequence, a sliding window's tokens at most; GDN
state read and written once per sequence), against the device's copy
bandwidth. A MoE layer's experts count only as far as the step's tokens
route to them, an MLA layer's kv_b_proj only in the form decode uses
(`_unread_weight_bytes`).
"""

from __future__ import annotations

import re
import time

import torch

from rdnac.runtime.model_runner import StepEntry


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str = "cuda", nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write of a 1 GiB buffer, 10 times). On a cpu (64 MiB
    by default) only for the benches' dry runs, where the harness runs tiny shapes to check itself."""
    x = torch.empty(nbytes or 1 << (30 if device == "cuda" else 26), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    synchronize(device)
    return 2 * x.numel() * 10 / (time.perf_counter() - start) / 1e9  # read + write, GB/s


def take_entries(llm, batch: int, tokens: int) -> list[StepEntry]:
    """`batch` sequences' block tables for `tokens` tokens each, and a state slot each where the plan
    keeps per-sequence state (GDN recurrent and conv state); `release` gives them back."""
    per_seq = -(-tokens // llm.runner.block_size)
    bm = llm.engine.block_manager
    return [StepEntry([1] * tokens, bm.take_blocks(per_seq), 0, tokens, bm.take_slot() if bm.num_slots else -1)
            for _ in range(batch)]


def release(llm, entries: list[StepEntry]) -> None:
    bm = llm.engine.block_manager
    for e in entries:
        bm.free(e.block_table)
        if e.state_slot >= 0:
            bm.free_slot(e.state_slot)


def tpot(llm, batch: int, context: int, steps: int = 50, warmup: int = 5) -> float:
    """Seconds per decode step for `batch` sequences at `context` tokens (KV already allocated). On a cpu
    plan (a bench's dry run under the interpreter) the same loop, without synchronizing."""
    device = llm.runner.device
    entries = [StepEntry(e.token_ids, e.block_table, context, context + 1, e.state_slot)
               for e in take_entries(llm, batch, context + 1)]
    for _ in range(warmup):
        llm.runner.execute(entries)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        llm.runner.execute(entries)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    release(llm, entries)
    return seconds


def decode_bytes(llm, batch: int, context: int) -> int:
    """Bytes one decode step reads: every weight but the embedding table (only `batch` rows of it are
    read, unless the logits reuse it), plus the declared state of `context` tokens per sequence."""
    return sum(decode_bytes_by_layer(llm, batch, context).values())


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def decode_bytes_by_layer(llm, batch: int, context: int) -> dict[int | None, int]:
    """decode_bytes per decoder layer (None: embeddings, final norm, logits), so a plan of fewer layers
    than its model can be scaled to the full depth layer by layer (rdnac.bench.families).

    Weights: each once, less what the step does not read (`_unread_weight_bytes`: the experts no token
    is routed to, the MLA form of kv_b_proj the decode step does not use). Paged state (KV, MLA's
    latent): `context` tokens per sequence, or the layer's sliding window if shorter. Per-sequence state
    (GDN recurrent and conv state): read and written once per sequence per step."""
    graph = llm.graph
    logits_weights = {n.inputs[2] for n in graph.nodes if n.op == "logits"}
    embed = {n.inputs[1] for n in graph.nodes if n.op == "embedding"} - logits_weights
    unread = _unread_weight_bytes(graph, llm.weights, batch)
    out: dict[int | None, float] = {}
    for name, t in llm.weights.items():
        size = batch * t.shape[1] * t.element_size() if name in embed else t.numel() * t.element_size()
        layer = _LAYER.search(name)
        key = int(layer.group(1)) if layer else None
        out[key] = out.get(key, 0) + size - unread.get(name, 0)
    windows = {name: n.attrs.get("sliding_window", 0) for n in graph.nodes if n.op == "attention"
               for name in n.inputs[1:3]}
    for spec in graph.state:
        if spec.is_paged:
            tokens = min(context, windows.get(spec.name) or context)
            state = batch * tokens * spec.nbytes
        else:
            state = 2 * batch * spec.nbytes  # read, then written back
        out[spec.layer] = out.get(spec.layer, 0) + state
    return {k: int(v) for k, v in out.items()}


def _unread_weight_bytes(graph, weights: dict, batch: int) -> dict[str, float]:
    """Bytes of each weight a decode step of `batch` tokens does not read. A MoE node reads the experts
    its tokens are routed to, E * (1 - (1 - k/E)**batch) of E expected under uniform routing (exactly k at
    batch 1); its per-expert inputs (weights, MXFP4 or FP8 block scales, biases: all [E, ...]) follow its ids
    input. An MLA node holds kv_b_proj in both forms; decode reads the one its decode_form names."""
    from rdnac.ir.moe import EXPERT_OPS, expected_active_experts

    top_k = {out: n.attrs["top_k"] for n in graph.nodes if n.op == "moe_route" for out in n.outputs}
    unread: dict[str, float] = {}
    for node in graph.nodes:
        if node.op in EXPERT_OPS:
            per_expert = [name for name in node.inputs[3:] if name in weights]  # [E, ...] each (and scales)
            num_experts = weights[per_expert[0]].shape[0]
            active = expected_active_experts(batch, top_k[node.inputs[2]], num_experts)
            for name in per_expert:
                t = weights[name]
                unread[name] = t.numel() * t.element_size() * (1 - active / num_experts)
        elif node.op == "mla_attention":
            kv_b, w_uk, w_uv = node.inputs[6:9]
            skipped = [kv_b] if node.attrs.get("decode_form") == "absorbed" else [w_uk, w_uv]
            for name in skipped:
                unread[name] = weights[name].numel() * weights[name].element_size()
    return unread


def decode_record(llm, batch: int, context: int, copy_gbps: float, steps: int = 50, warmup: int = 5) -> dict:
    """One BENCHMARKS.md decode row: TPOT, tokens/s and achieved bandwidth at `batch` x `context`. For a
    plan sharded over N ranks (`--tp N`) the bytes and bandwidth are one rank's (rank 0's weights and
    state, what its GPU reads), and `total_GBps` is N times that."""
    t = tpot(llm, batch, context, steps, warmup)
    read = decode_bytes(llm, batch, context)
    record = {"batch": batch, "context": context, "tpot_ms": round(t * 1e3, 3), "tokens_per_s": round(batch / t, 1),
              "bytes_read_GB": round(read / 1e9, 3), "achieved_GBps": round(read / t / 1e9, 1),
              "pct_of_copy": round(100 * read / t / 1e9 / copy_gbps, 1), "copy_GBps": round(copy_gbps, 1),
              "plan_pdl": llm.plan.body["runtime"].get("pdl", False)}
    ranks = llm.plan.num_ranks
    if ranks > 1:
        record.update(ranks=ranks, per_rank=True, total_GBps=round(ranks * read / t / 1e9, 1))
    return record
