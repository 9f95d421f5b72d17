"""Prefill measurement on the GPU: seconds of one prefill step, its host part, tokens/s and TFLOP/s.

TFLOP/s counts 2 FLOPs per weight element per token for the linears, the
logits of the last token only, and causal attention (QK^T and PV).
"""

from __future__ import annotations

import shutil
import subprocess
import time

import torch

from rdnac.bench.decode import release, synchronize, take_entries

LINEAR_OPS = ("linear", "linear_fp8", "linear_int8", "linear_gated_act", "gated_act_linear_fp8")


def prefill_flops(llm, tokens: int, context: int) -> float:
    """FLOPs of a prefill of `tokens` tokens: 2 per weight element per token for the linears and
    logits of the last token, plus causal attention (QK^T and PV) in every attention layer. MoE layers
    count each token's top-k experts (2 per expert weight element), MLA its expanded form (K of nope +
    rope dims, V of v_head_dim per head), Gated DeltaNet layers the recurrent form's state products
    (decay, k^T S, the rank-1 update and q S: 8 per state element per token; the chunked kernel does
    more, this is the work the model needs)."""
    graph = llm.graph
    linear = sum(llm.weights[n.inputs[1]].numel() for n in graph.nodes if n.op in LINEAR_OPS)
    logits = sum(llm.weights[n.inputs[2]].numel() for n in graph.nodes if n.op == "logits")
    top_k = {out: n.attrs["top_k"] for n in graph.nodes if n.op == "moe_route" for out in n.outputs}
    experts = attn = 0.0
    pairs = tokens * (context + 1) / 2  # causal (query, key) pairs
    for n in graph.nodes:
        a = n.attrs
        if n.op in ("moe_experts", "moe_experts_mxfp4"):
            mxfp4 = n.op == "moe_experts_mxfp4"
            w13, w2 = (llm.weights[name] for name in (n.inputs[3:7:2] if mxfp4 else n.inputs[3:5]))
            per_expert = (w13[0].numel() + w2[0].numel()) * (2 if mxfp4 else 1)  # two e2m1 codes a byte
            experts += top_k[n.inputs[2]] * per_expert
        elif n.op == "attention":
            window = a.get("sliding_window") or 0
            p = pairs if not window or window >= context else tokens * min(window, context)
            attn += 4 * a["num_heads"] * a["head_dim"] * p
        elif n.op == "mla_attention":
            attn += 2 * a["num_heads"] * (a["qk_nope_head_dim"] + a["qk_rope_head_dim"] + a["v_head_dim"]) * pairs
        elif n.op == "gated_delta_rule":
            attn += 8 * a["num_v_heads"] * a["k_head_dim"] * a["v_head_dim"] * tokens
    return 2.0 * linear * tokens + 2.0 * logits + 2.0 * experts * tokens + attn


def prefill_seconds(llm, tokens: int, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of a prefill step, and of its host part (until execute returns, every kernel
    enqueued): a host part close to the whole says the step is bound by launches, not kernels."""
    [entry] = take_entries(llm, 1, tokens)
    vocab = llm.graph.attrs["vocab_size"]
    entry.token_ids = [((7 * i) % 50000 + 300) % vocab for i in range(tokens)]
    device = llm.runner.device
    times, host = [], []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        llm.runner.execute([entry])  # a slot's state is overwritten, not continued: its start is 0
        host.append(time.perf_counter() - start)
        synchronize(device)
        times.append(time.perf_counter() - start)
    release(llm, [entry])
    median = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]  # noqa: E731  (the first is a warm-up)
    return median(times), median(host)


class GpuClocks:
    """SM clock (MHz) and board power (W) sampled by nvidia-smi every 50 ms while the block runs: a
    sustained prefill may run below the clock the kernels were tuned at (short bursts)."""

    def __enter__(self):
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                          "-lms", "50"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc) -> None:
        self.samples = []
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate()
            for line in out.splitlines():
                try:
                    clock, power = (float(f) for f in line.split(","))
                except ValueError:  # the last line may be cut off by terminate()
                    continue
                self.samples.append((clock, power))

    def summary(self) -> dict:
        if not self.samples:
            return {"gpu_clocks": "not sampled (nvidia-smi not found or no sample in the window)"}
        clocks = sorted(c for c, _ in self.samples)
        return {"sm_mhz_min": clocks[0], "sm_mhz_median": clocks[len(clocks) // 2],
                "power_w_max": max(p for _, p in self.samples), "clock_samples": len(clocks)}


def prefill_record(llm, tokens: int, repeats: int = 5) -> dict:
    """One BENCHMARKS.md prefill row: median step time, host enqueue time, tokens/s, TFLOP/s, GPU clocks."""
    with GpuClocks() as clocks:
        t, host = prefill_seconds(llm, tokens, repeats)
    return {"prefill_tokens": tokens, "prefill_ms": round(t * 1e3, 2), "host_enqueue_ms": round(host * 1e3, 2),
            "tokens_per_s": round(tokens / t), "tflops": round(prefill_flops(llm, tokens, tokens) / t / 1e12, 1),
            **clocks.summary()}
