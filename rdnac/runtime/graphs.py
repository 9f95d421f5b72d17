"""Decode steps captured as CUDA/HIP graphs, one per batch bucket, sharing one memory pool.

A decode step of B sequences replays the graph of the smallest bucket >= B.
Rows past B are padding: token 0 at position 0, seq_len 1, slot -1 (the KV
write skips it) and a block table of block 0, so attention reads one finite
key and nothing is written (seq_len 0 would give 0/0 = NaN). Inputs are
copied into static buffers before replay, from pinned host buffers (asynchronous:
no stream sync, so the host prepares step n+1 while step n runs), the block
table only as wide as the step's longest row; nothing inside the captured step
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
        # per bucket: pinned host buffers the inputs are written into (and numpy views of them), and an
        # event after the step's copies out of them, so a host running steps ahead never overwrites a
        # buffer before its copy ran
        self._staging: dict[int, tuple[dict[str, torch.Tensor], dict]] = {}
        self._copied: dict[int, torch.cuda.Event] = {}
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
            self._staging[bucket] = self._pinned(bucket)
            self._copied[bucket] = torch.cuda.Event()
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

    def _pinned(self, bucket: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Pinned host buffers for a bucket's per-step inputs (the block table flat, [bucket * max_blocks])."""
        static = self._static[bucket]
        staging = {name: torch.empty(static[name].numel(), dtype=static[name].dtype).pin_memory()
                   for name in ("token_ids", "positions", "slot_mapping", "seq_lens", "block_tables")}
        return staging, {name: t.numpy() for name, t in staging.items()}

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
        staging, numpy = self._staging[bucket]
        self._copied[bucket].synchronize()  # the last step's copies out of these pinned buffers have run
        for name, values in rows.items():
            numpy[name][:] = values
            static[name].copy_(staging[name], non_blocking=True)  # pinned: no stream sync, no host wait
        # Only the columns this step reads (attention reads a row's entries below its seq_len): a
        # [bucket, width] block of the pinned table, zero past each row's end and in the padding rows.
        width = max(len(row) for row in host["block_tables"])
        table = numpy["block_tables"][: bucket * width].reshape(bucket, width)
        table[:] = 0
        for i, row in enumerate(host["block_tables"]):
            table[i, : len(row)] = row
        static["block_tables"][:, :width].copy_(staging["block_tables"][: bucket * width].view(bucket, width),
                                                non_blocking=True)
        self._copied[bucket].record()
        self._graphs[bucket].replay()
        return self._logits[bucket][:num_seqs]
