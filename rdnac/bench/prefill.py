"""Prefill measurement on the GPU: seconds of one prefill step, its host part, tokens/s and TFLOP/s.

TFLOP/s counts 2 FLOPs per weight element per token for the linears, the
logits of the last token only, and causal attention (QK^T and PV).
"""

from __future__ import annotations

import shutil
import subprocess
import time

import torch

from rdnac.runtime.model_runner import StepEntry

LINEAR_OPS = ("linear", "linear_fp8", "linear_int8", "linear_gated_act", "gated_act_linear_fp8")


def prefill_flops(llm, tokens: int, context: int) -> float:
    """FLOPs of a prefill of `tokens` tokens: 2 per weight element per token for the linears and
    logits of the last token, plus causal attention (QK^T and PV)."""
    graph = llm.graph
    linear = sum(llm.weights[n.inputs[1]].numel() for n in graph.nodes if n.op in LINEAR_OPS)
    logits = sum(llm.weights[n.inputs[2]].numel() for n in graph.nodes if n.op == "logits")
    a = graph.attrs
    attn = 4 * a["num_layers"] * a["num_heads"] * a["head_dim"] * tokens * (context + 1) / 2
    return 2.0 * linear * tokens + 2.0 * logits + attn


def prefill_seconds(llm, tokens: int, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of a prefill step, and of its host part (until execute returns, every kernel
    enqueued): a host part close to the whole says the step is bound by launches, not kernels."""
    blocks = llm.engine.block_manager.take_blocks(-(-tokens // llm.runner.block_size))
    ids = [(7 * i) % 50000 + 300 for i in range(tokens)]
    times, host = [], []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.runner.execute([StepEntry(ids, blocks, 0, tokens)])
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    llm.engine.block_manager.free(blocks)
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


def prefill_record(llm, tokens: int) -> dict:
    """One BENCHMARKS.md prefill row: median step time, host enqueue time, tokens/s, TFLOP/s, GPU clocks."""
    with GpuClocks() as clocks:
        t, host = prefill_seconds(llm, tokens)
    return {"prefill_tokens": tokens, "prefill_ms": round(t * 1e3, 2), "host_enqueue_ms": round(host * 1e3, 2),
            "tokens_per_s": round(tokens / t), "tflops": round(prefill_flops(llm, tokens, tokens) / t / 1e12, 1),
            **clocks.summary()}
