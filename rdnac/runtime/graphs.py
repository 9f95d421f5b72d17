"""Decode steps captured as CUDA/HIP graphs, one per batch bucket, sharing one memory pool.

A decode step of B sequences replays the graph of the smallest bucket >= B.
Rows past B are padding: token 0 at position 0, seq_len 1, slot -1 (the KV
write skips it) and a block table of block 0, so attention reads one finite
key and nothing is written (seq_len 0 would give 0/0 = NaN). Inputs are
copied into static buffers before replay; nothing inside the captured step
syncs with the host, allocates differently from warm-up, or compiles.
"""

from __future__ import annotations

import time

import torch

from rdnac.runtime.executor import Executor, StepMeta

_INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "cu_seqlens_q", "logits_indices")


class DecodeGraphs:
    def __init__(self, executor: Executor, weights: dict[str, torch.Tensor], cache_inputs: dict[str, torch.Tensor],
                 buckets: list[int], max_blocks_per_seq: int, device: str):
        self.buckets = sorted(buckets)
        self.max_blocks = max_blocks_per_seq
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._static: dict[int, dict[str, torch.Tensor]] = {}
        self._logits: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        started = time.perf_counter()
        for bucket in reversed(self.buckets):  # largest first: the pool then fits the smaller ones
            static = self._padding(bucket, device)
            env = {**weights, **cache_inputs, **static}
            meta = StepMeta("decode", bucket, 1)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: loads modules, builds launchers, settles allocations
                    executor.run(dict(env), meta)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = executor.run(dict(env), meta)["logits"]
            self._graphs[bucket], self._static[bucket], self._logits[bucket] = graph, static, logits
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started

    def _padding(self, bucket: int, device: str) -> dict[str, torch.Tensor]:
        """Static input buffers of a bucket, filled with the padding row."""
        return {
            "token_ids": torch.zeros(bucket, dtype=torch.int64, device=device),
            "positions": torch.zeros(bucket, dtype=torch.int64, device=device),
            "slot_mapping": torch.full((bucket,), -1, dtype=torch.int64, device=device),
            "block_tables": torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=device),
            "seq_lens": torch.ones(bucket, dtype=torch.int32, device=device),
            "cu_seqlens_q": torch.arange(bucket + 1, dtype=torch.int32, device=device),
            "logits_indices": torch.arange(bucket, dtype=torch.int64, device=device),
        }

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    @torch.inference_mode()
    def run(self, host: dict[str, list], num_seqs: int) -> torch.Tensor:
        """Replay the bucket's graph for `num_seqs` real rows given host-side input lists; logits [B, V]."""
        bucket = self.bucket_for(num_seqs)
        static = self._static[bucket]
        pad = bucket - num_seqs
        rows = {
            "token_ids": host["token_ids"] + [0] * pad,
            "positions": host["positions"] + [0] * pad,
            "slot_mapping": host["slot_mapping"] + [-1] * pad,
            "seq_lens": host["seq_lens"] + [1] * pad,
        }
        for name, values in rows.items():
            static[name].copy_(torch.tensor(values, dtype=static[name].dtype), non_blocking=True)
        tables = torch.zeros(bucket, self.max_blocks, dtype=torch.int32)
        for i, row in enumerate(host["block_tables"]):
            tables[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        static["block_tables"].copy_(tables, non_blocking=True)
        self._graphs[bucket].replay()
        return self._logits[bucket][:num_seqs]
