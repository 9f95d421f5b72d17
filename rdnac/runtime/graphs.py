"""Decode steps captured as CUDA/HIP graphs, one per batch bucket, sharing one memory pool.

A decode step of B sequences replays the graph of the smallest bucket >= B.
Rows past B are padding: token 0 at position 0, seq_len 1, slot -1 (the KV
write skips it) and a block table of block 0, so attention reads one finite
key and nothing is written (seq_len 0 would give 0/0 = NaN). Inputs are
copied into static buffers before replay; nothing inside the captured step
syncs with the host, allocates differently from warm-up, or compiles.

The per-step inputs of a bucket (token ids, positions, slots: int64; seq_lens,
block tables: int32) are views of one device byte buffer, filled by one
host-to-device copy from a pinned staging buffer of the same layout: one copy
in the stream per step instead of five pageable ones. Two staging buffers
alternate, and a buffer is refilled only after the copy that last read it has
finished (an event), so a host running ahead never overwrites a copy in flight.
"""

from __future__ import annotations

import math
import time

import torch

from rdnac.runtime.executor import Executor, StepMeta

_ALIGN = 256
_INPUTS = ("token_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "cu_seqlens_q", "logits_indices")


class DecodeGraphs:
    def __init__(self, executor: Executor, weights: dict[str, torch.Tensor], cache_inputs: dict[str, torch.Tensor],
                 buckets: list[int], max_blocks_per_seq: int, device: str):
        self.buckets = sorted(buckets)
        self.max_blocks = max_blocks_per_seq
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._static: dict[int, dict[str, torch.Tensor]] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._raw: dict[int, torch.Tensor] = {}  # bucket -> device byte buffer the static inputs view
        self._staging: dict[int, list] = {}  # bucket -> two (pinned host buffer, event of its last copy)
        self._turn = 0
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

    def _sections(self, bucket: int) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
        """(name, dtype, shape, byte offset) of each per-step input in a bucket's byte buffer; every
        section starts on a 256-byte boundary (kernels assume 16-byte aligned pointers)."""
        sections, offset = [], 0
        for name, dtype, shape in (("token_ids", torch.int64, (bucket,)), ("positions", torch.int64, (bucket,)),
                                   ("slot_mapping", torch.int64, (bucket,)), ("seq_lens", torch.int32, (bucket,)),
                                   ("block_tables", torch.int32, (bucket, self.max_blocks))):
            sections.append((name, dtype, shape, offset))
            offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        return sections

    def _layout(self, raw: torch.Tensor, bucket: int) -> dict[str, torch.Tensor]:
        """The per-step inputs as views of one byte buffer (see `_sections`)."""
        return {name: raw[offset: offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for name, dtype, shape, offset in self._sections(bucket)}

    def _padding(self, bucket: int, device: str) -> dict[str, torch.Tensor]:
        """Static input buffers of a bucket, filled with the padding row."""
        name, dtype, shape, offset = self._sections(bucket)[-1]
        nbytes = offset + math.prod(shape) * dtype.itemsize
        raw = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._raw[bucket] = raw
        self._staging[bucket] = [(torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True), torch.cuda.Event())
                                 for _ in range(2)]
        static = self._layout(raw, bucket)
        static["slot_mapping"].fill_(-1)
        static["seq_lens"].fill_(1)
        return {**static, "cu_seqlens_q": torch.arange(bucket + 1, dtype=torch.int32, device=device),
                "logits_indices": torch.arange(bucket, dtype=torch.int64, device=device)}

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    @torch.inference_mode()
    def run(self, host: dict[str, list], num_seqs: int) -> torch.Tensor:
        """Replay the bucket's graph for `num_seqs` real rows given host-side input lists; logits [B, V]."""
        bucket = self.bucket_for(num_seqs)
        pad = bucket - num_seqs
        pinned, copied = self._staging[bucket][self._turn]
        self._turn ^= 1
        copied.synchronize()  # the copy that last read this staging buffer is done
        views = self._layout(pinned, bucket)
        for name, fill in (("token_ids", 0), ("positions", 0), ("slot_mapping", -1), ("seq_lens", 1)):
            views[name].copy_(torch.tensor(host[name] + [fill] * pad, dtype=views[name].dtype))
        tables = []
        for row in host["block_tables"]:
            tables += list(row) + [0] * (self.max_blocks - len(row))
        views["block_tables"].view(-1).copy_(torch.tensor(tables + [0] * (pad * self.max_blocks), dtype=torch.int32))
        self._raw[bucket].copy_(pinned, non_blocking=True)
        copied.record()
        self._graphs[bucket].replay()
        return self._logits[bucket][:num_seqs]
