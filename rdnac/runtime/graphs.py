"""Decode steps captured as CUDA/HIP graphs, one per batch bucket, sharing one memory pool.

Per bucket, three graphs: the model step, which also takes the greedy tokens
(argmax), the sampler's `draw` over that step's logits with the rows'
temperatures, seeds and steps (sampling.py), replayed after it when some row
samples, and the same draw after the grammars' token bitmask is applied (one
masked op over the batch; a static [bucket, ceil(V / 32)] buffer, all ones
in rows without a grammar), replayed instead when some row has a grammar.
So a plain decode step (greedy and temperature sampling, seeded or not,
constrained by a grammar or not) samples inside the graphs; a batch with
top-k/top-p/min-p, a repetition penalty or logprobs is sampled by
`sampling.sample` from the step's logits, which gives the same tokens for
the rows that need none of those.

A decode step of B sequences replays the graph of the smallest bucket >= B.
Rows past B are padding: token 0 at position 0, seq_len 1, slot -1 (the KV
write skips it) and a block table of block 0, so attention reads one finite
key and nothing is written (seq_len 0 would give 0/0 = NaN); state slot -1
(per-sequence state is read as zeros and not written). Inputs are
copied into static buffers before replay, from pinned host buffers (asynchronous:
no stream sync, so the host prepares step n+1 while step n runs), the block
table only as wide as the step's longest row; nothing inside the captured step
syncs with the host, allocates differently from warm-up, or compiles.
"""

from __future__ import annotations

import time

import torch

from rdnac.runtime.executor import Executor, StepMeta
from rdnac.runtime.sampling import SamplingBatch, apply_token_bitmask, draw, seed_to_int64

# per-step inputs written from the host before a replay (the block table is handled apart: its width varies)
_STEP_INPUTS = ("token_ids", "positions", "slot_mapping", "seq_lens", "temperature", "seeds", "steps")


class DecodeGraphs:
    def __init__(self, executor: Executor, weights: dict[str, torch.Tensor], cache_inputs: dict[str, torch.Tensor],
                 buckets: list[int], max_blocks_per_seq: int, device: str, has_state_slots: bool = False):
        self.buckets = sorted(buckets)
        self.max_blocks = max_blocks_per_seq
        self.has_state_slots = has_state_slots
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._samplers: dict[int, torch.cuda.CUDAGraph] = {}
        self._static: dict[int, dict[str, torch.Tensor]] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self._greedy: dict[int, torch.Tensor] = {}
        self._sampled: dict[int, torch.Tensor] = {}
        self._masked_samplers: dict[int, torch.cuda.CUDAGraph] = {}
        self._masked: dict[int, torch.Tensor] = {}
        # per bucket: pinned host buffers the inputs are written into (and numpy views of them), and an
        # event after the step's copies out of them, so a host running steps ahead never overwrites a
        # buffer before its copy ran
        self._staging: dict[int, tuple[dict[str, torch.Tensor], dict]] = {}
        self._copied: dict[int, torch.cuda.Event] = {}
        pool = torch.cuda.graph_pool_handle()
        started = time.perf_counter()
        for bucket in reversed(self.buckets):  # largest first: the pool then fits the smaller ones
            static = self._padding(bucket, device)
            model_inputs = {k: v for k, v in static.items() if k not in ("temperature", "seeds", "steps")}
            env = {**weights, **cache_inputs, **model_inputs}
            meta = StepMeta("decode", bucket, 1)

            def model_step():
                logits = executor.run(dict(env), meta)["logits"]
                return logits, logits.argmax(dim=-1)

            self._graphs[bucket], (self._logits[bucket], self._greedy[bucket]) = self._capture(model_step, pool)
            self._samplers[bucket], self._sampled[bucket] = self._capture(
                lambda: draw(self._logits[bucket], static["temperature"], static["seeds"], static["steps"]), pool)
            vocab = self._logits[bucket].shape[-1]
            static["token_bitmask"] = torch.full((bucket, (vocab + 31) // 32), -1, dtype=torch.int32, device=device)
            self._masked_samplers[bucket], self._masked[bucket] = self._capture(
                lambda: draw(apply_token_bitmask(self._logits[bucket], static["token_bitmask"]),
                             static["temperature"], static["seeds"], static["steps"]), pool)
            self._static[bucket] = static
            self._staging[bucket] = self._pinned(bucket)
            self._copied[bucket] = torch.cuda.Event()
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started

    @staticmethod
    def _capture(step, pool):
        """(graph, outputs) of `step` captured after two warm-up runs on a side stream."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: loads modules, builds launchers, settles allocations
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = step()
        return graph, outputs

    def _padding(self, bucket: int, device: str) -> dict[str, torch.Tensor]:
        """Static input buffers of a bucket, filled with the padding row (greedy, for the sampler)."""
        static = {
            "token_ids": torch.zeros(bucket, dtype=torch.int64, device=device),
            "positions": torch.zeros(bucket, dtype=torch.int64, device=device),
            "slot_mapping": torch.full((bucket,), -1, dtype=torch.int64, device=device),
            "block_tables": torch.zeros(bucket, self.max_blocks, dtype=torch.int32, device=device),
            "seq_lens": torch.ones(bucket, dtype=torch.int32, device=device),
            "cu_seqlens_q": torch.arange(bucket + 1, dtype=torch.int32, device=device),
            "logits_indices": torch.arange(bucket, dtype=torch.int64, device=device),
            "temperature": torch.zeros(bucket, dtype=torch.float32, device=device),
            "seeds": torch.zeros(bucket, dtype=torch.int64, device=device),
            "steps": torch.zeros(bucket, dtype=torch.int64, device=device),
        }
        if self.has_state_slots:
            static["state_slots"] = torch.full((bucket,), -1, dtype=torch.int64, device=device)
        return static

    def _pinned(self, bucket: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Pinned host buffers for a bucket's per-step inputs (the block table flat, [bucket * max_blocks])."""
        static = self._static[bucket]
        staging = {name: torch.empty(static[name].numel(), dtype=static[name].dtype).pin_memory()
                   for name in (*_STEP_INPUTS, "block_tables", *(("state_slots",) if self.has_state_slots else ()))}
        return staging, {name: t.numpy() for name, t in staging.items()}

    def bucket_for(self, num_seqs: int) -> int | None:
        return next((b for b in self.buckets if b >= num_seqs), None)

    @torch.inference_mode()
    def run(self, host: dict[str, list], num_seqs: int,
            sampling: SamplingBatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket's graphs for `num_seqs` real rows given host-side input lists; returns logits [B, V]
        and tokens [B]: greedy, or drawn by `sampling` (a plain batch: see SamplingBatch.is_plain), under its
        token bitmask if it has one."""
        bucket = self.bucket_for(num_seqs)
        static = self._static[bucket]
        pad = bucket - num_seqs
        rows = {
            "token_ids": host["token_ids"] + [0] * pad,
            "positions": host["positions"] + [0] * pad,
            "slot_mapping": host["slot_mapping"] + [-1] * pad,
            "seq_lens": host["seq_lens"] + [1] * pad,
        }
        if self.has_state_slots:  # slot -1: a padding row reads zero state and writes none (ir/linear_attention)
            rows["state_slots"] = host["state_slots"] + [-1] * pad
        is_masked = sampling is not None and sampling.token_bitmask is not None
        is_sampled = sampling is not None and (not sampling.is_greedy or is_masked)
        if is_sampled:
            rows.update(temperature=sampling.temperatures + [0.0] * pad,
                        seeds=[seed_to_int64(s) for s in sampling.seeds] + [0] * pad, steps=sampling.steps + [0] * pad)
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
        if is_masked:  # already on the device (token_bitmask.py): a device copy, padding rows all ones
            static["token_bitmask"][:num_seqs].copy_(sampling.token_bitmask, non_blocking=True)
            static["token_bitmask"][num_seqs:].fill_(-1)
        self._graphs[bucket].replay()
        if not is_sampled:
            return self._logits[bucket][:num_seqs], self._greedy[bucket][:num_seqs]
        if is_masked:
            self._masked_samplers[bucket].replay()
            return self._logits[bucket][:num_seqs], self._masked[bucket][:num_seqs]
        self._samplers[bucket].replay()
        return self._logits[bucket][:num_seqs], self._sampled[bucket][:num_seqs]
