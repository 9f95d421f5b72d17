"""ModelRunner: one plan on one device: weights, launcher, state, decode graphs and `execute(step)`.

A step is a list of `StepEntry`s, one per sequence: its token range [start,
end), its block table (and state slot). `execute` packs them into one flat
ragged batch with its attention metadata (positions, slot_mapping,
block_tables, seq_lens, cu_seqlens_q, logits_indices), runs the plan graph
(the reference interpreter for a cpu plan, the plan's kernels otherwise) and,
given a `SamplingBatch`, samples one token per entry (`sampling.py`). A
decode step on a GPU replays a captured graph that samples too. The runner
owns no loop and no requests: `LLMEngine` drives it.
"""

from __future__ import annotations

import array
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rdnac.errors import RequestError
from rdnac.ir import collectives, interpreter
from rdnac.ir.state import bytes_per_sequence
from rdnac.kernels.launch import InterpretLauncher
from rdnac.plans import read_plan
from rdnac.runtime.executor import Executor, StepMeta
from rdnac.runtime.sampling import SamplingBatch, sample
from rdnac.runtime.state_cache import StateCache, bytes_per_block

_UNLIMITED = 1 << 30


def _host_ints(values: list[int], typecode: str) -> torch.Tensor:
    """A CPU int64 ("q") or int32 ("i") tensor of `values`, through array.array: ~10x faster than
    torch.tensor(list) (740 us for 2048 ints on the development machine, against 80)."""
    dtype = torch.int64 if typecode == "q" else torch.int32
    return torch.frombuffer(array.array(typecode, values), dtype=dtype) if values else torch.empty(0, dtype=dtype)


@dataclass
class StepEntry:
    """One sequence's part of a model step: tokens [start, end) of `token_ids`."""
    token_ids: list[int]
    block_table: list[int]
    start: int
    end: int
    state_slot: int = -1  # its per-sequence state slot, if the plan keeps per-sequence state


@dataclass
class StepOutput:
    logits: torch.Tensor  # float32 [entries, V] at each entry's last token, or [tokens, V] with logits_all
    tokens: torch.Tensor | None = None  # [entries] int64, when the step was given a SamplingBatch
    logprobs: torch.Tensor | None = None  # [entries] float32, when the SamplingBatch asked for them


class ModelRunner:
    def __init__(self, plan, weights: dict[str, torch.Tensor], device: str, launcher=None,
                 enforce_eager: bool = False, graph=None, group=None):
        self.plan = plan
        self.group = group  # a sharded plan's torch.distributed group (runtime/distributed.py); None: one rank
        self.device = device
        self.graph = graph if graph is not None else plan.graph()
        self.weights = weights
        rt = plan.body["runtime"]
        self.block_size = rt["kv_block_size"]
        self.max_model_len = rt["max_model_len"]
        self.max_num_seqs = rt.get("max_num_seqs") or _UNLIMITED
        self.max_num_batched_tokens = rt.get("max_num_batched_tokens") or _UNLIMITED
        self.vocab_size = self.graph.attrs["vocab_size"]
        self.enforce_eager = enforce_eager
        self.load_timings: dict[str, float] = {}  # set by load: where start-up time went
        self.cache: StateCache | None = None
        self.graphs = None
        self._executor = Executor(self.graph, plan.body["program"], launcher, device) if launcher else None

    @classmethod
    def load(cls, plan_path: str | Path, device: str = "cpu", verify_weights: bool = True,
             interpret: bool = False, enforce_eager: bool = False, launch_pdl: bool = True, rank: int = 0,
             group=None) -> ModelRunner:
        """Load a plan. A cpu-target plan runs under the reference interpreter (on cpu or cuda);
        a GPU-target plan runs its precompiled kernels on `cuda`, or with `interpret=True` its own
        kernel specializations under the Triton interpreter on the CPU. `launch_pdl=False` launches a
        plan built with programmatic dependent launch without it (same binaries; for measuring it)."""
        started = time.perf_counter()
        plan = read_plan(plan_path)
        graph = plan.graph()  # refuses an unknown state before any weights load
        world = 1 if group is None else torch.distributed.get_world_size(group)
        if plan.num_ranks != world:
            raise RequestError(f"{plan.path}: a --tp {plan.num_ranks} plan requires {plan.num_ranks} ranks; got "
                               f"{world}; load it with rdnac.load / rdnac run / rdnac serve (they start the ranks) "
                               "or under torchrun --nproc-per-node " + str(plan.num_ranks))
        timings = {"plan_s": time.perf_counter() - started}
        if device not in ("cpu", "cuda"):
            raise RequestError(f"device requires cpu or cuda; got {device!r}")
        target = plan.header["target"]
        is_gpu_plan = bool(plan.body.get("kernels")) or target != "cpu"
        if is_gpu_plan:  # its kernels and program, against rdnac's kernel library, before any device is asked
            from rdnac.runtime.kernel_check import check_kernels

            check_kernels(plan.body, target, plan.path)
        has_gpu = torch.cuda.is_available()
        if interpret:
            if not is_gpu_plan:
                raise RequestError(f"{plan.path}: --interpret requires a plan built for a GPU target (it runs "
                                   f"that plan's Triton kernels on the CPU); this plan's target is {target}")
            device = "cpu"
        elif is_gpu_plan and not has_gpu:  # one message that says what works here, whatever --device said
            raise RequestError(f"{plan.path}: a plan for target {target} requires a {target} GPU visible to torch; "
                               f"none found; on this machine, --interpret runs its kernels under the Triton "
                               f"interpreter on the CPU (slow: for checking a plan), or compile the model for "
                               f"--target cpu to run it here")
        elif is_gpu_plan and device != "cuda":
            raise RequestError(f"{plan.path}: a plan for target {target} runs on the GPU; requires --device cuda "
                               f"(its default), or --interpret to run its kernels under the Triton interpreter")
        elif device == "cuda" and not has_gpu:
            raise RequestError(f"device cuda requires a CUDA/ROCm GPU visible to torch; none found; this "
                               f"{target} plan runs on the CPU with --device cpu (its default)")
        launcher = None
        if is_gpu_plan and interpret:
            launcher = InterpretLauncher()
        elif is_gpu_plan:
            from rdnac.runtime.aot import AotLauncher, check_target

            check_target(target, torch.device("cuda"))
            mark = time.perf_counter()
            launcher = AotLauncher.for_plan(plan.body, "cuda", launch_pdl=launch_pdl)
            timings["kernels_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        weights = plan.load_weights(device, verify=verify_weights, rank=rank)  # straight onto the device
        if device == "cuda":
            torch.cuda.synchronize()
        timings["weights_s"] = time.perf_counter() - mark
        timings["weights_gb"] = sum(t.numel() * t.element_size() for t in weights.values()) / 1e9
        runner = cls(plan, weights, device, launcher, enforce_eager=enforce_eager, graph=graph, group=group)
        runner.load_timings = timings
        return runner

    # ------------------------------------------------------------ state

    @property
    def bytes_per_block(self) -> int:
        """Paged state bytes of one block of `block_size` tokens, all layers."""
        return bytes_per_block(self.graph.state, self.block_size)

    @property
    def bytes_per_sequence(self) -> int:
        """Per-sequence state bytes (0 for a plan that keeps none)."""
        return bytes_per_sequence(self.graph.state)

    def allocate_state(self, num_blocks: int, num_slots: int, max_num_seqs: int | None = None) -> StateCache:
        """Allocate (or replace) the declared state: `num_blocks` pages, `num_slots` per-sequence slots.
        Graphs bake in the state's addresses, so this captures them again (up to `max_num_seqs` rows)."""
        self.graphs = None
        self.cache = None
        self.cache = StateCache(self.graph.state, num_blocks, self.block_size, num_slots, self.device)
        if self.use_graphs:
            self.capture_graphs(max_num_seqs or self.max_num_seqs)
        return self.cache

    def profile_step_bytes(self, num_tokens: int) -> int:
        """Peak device bytes one prefill step of `num_tokens` allocates beyond the weights and the state
        (activations, its logits row, kernel workspaces), measured by running one such step on a
        throwaway state just big enough for it, as vLLM profiles before sizing its KV cache: the executor
        keeps a step's intermediates alive until the step ends, so this grows with the layer count."""
        assert self.device == "cuda"
        self.graphs = self.cache = None  # any earlier state is dropped: allocate_state replaces it next
        num_blocks = -(-num_tokens // self.block_size)
        self.cache = StateCache(self.graph.state, num_blocks, self.block_size, 1 if self.bytes_per_sequence else 0,
                                self.device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            self.execute([StepEntry([0] * num_tokens, list(range(num_blocks)), 0, num_tokens, state_slot=0)])
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        finally:
            self.cache = None
            torch.cuda.empty_cache()

    @property
    def use_graphs(self) -> bool:
        return self._executor is not None and self.device == "cuda" and not self.enforce_eager

    def capture_graphs(self, max_num_seqs: int | None = None) -> float:
        """Capture decode steps (model and sampler) for every batch bucket up to max_num_seqs (the plan's
        by default); returns the capture seconds."""
        from rdnac.runtime.executor import BUCKETS
        from rdnac.runtime.graphs import DecodeGraphs

        limit = min(max_num_seqs or self.max_num_seqs, self.max_num_seqs)
        buckets = [b for b in BUCKETS if b < 2 * limit and b <= self.max_num_seqs] or [1]
        max_blocks = -(-self.max_model_len // self.block_size)
        with torch.inference_mode(), collectives.use_group(self.group):  # a sharded plan's collectives, captured
            self.graphs = DecodeGraphs(self._executor, self.weights, self.cache.inputs(), buckets, max_blocks,
                                       self.device, has_state_slots="state_slots" in self.graph.inputs)
        print(f"rdnac: captured decode graphs for batch buckets {buckets} in {self.graphs.capture_seconds:.2f} s",
              file=sys.stderr)
        return self.graphs.capture_seconds

    # ------------------------------------------------------------ running

    def execute(self, entries: list[StepEntry], sampling: SamplingBatch | None = None,
                logits_all: bool = False) -> StepOutput:
        """Run one model step; with `sampling` (one row per entry) also sample a token per entry.

        Each entry needs blocks for `end` tokens. Logits are float32 on the runner's device: one row
        per entry (at its last token), or one per token with `logits_all`. The step must fit the plan:
        all entries single-token (decode, at most max_num_seqs), or at most max_num_batched_tokens
        tokens in all."""
        assert self.cache is not None, "execute() before allocate_state()"
        assert sampling is None or (len(sampling.temperatures) == len(entries) and not logits_all)
        bs = self.block_size
        tokens, positions, slots, cu, lens, last = [], [], [], [0], [], []
        for e in entries:  # slices and ranges, not a Python loop per token: a 2048-token prefill's host time
            table, span = e.block_table, range(e.start, e.end)
            tokens += e.token_ids[e.start:e.end]
            positions += span
            slots += [table[p // bs] * bs + p % bs for p in span]
            cu.append(len(tokens))
            lens.append(e.end)
            last.append(len(tokens) - 1)
        has_state_slots = "state_slots" in self.graph.inputs
        is_decode = all(e.end - e.start == 1 for e in entries)
        if is_decode and not logits_all and self.graphs is not None and self.graphs.bucket_for(len(entries)):
            host = {"token_ids": tokens, "positions": positions, "slot_mapping": slots, "seq_lens": lens,
                    "block_tables": [e.block_table for e in entries]}
            if has_state_slots:
                host["state_slots"] = [e.state_slot for e in entries]
            plain = sampling is not None and sampling.is_plain
            logits, drawn = self.graphs.run(host, len(entries), sampling if plain else None)
            if sampling is None or plain:
                return StepOutput(logits, drawn)
            return StepOutput(logits, *sample(logits, sampling))
        max_blocks = max(len(e.block_table) for e in entries)
        tables = [b for e in entries for b in (*e.block_table, *[0] * (max_blocks - len(e.block_table)))]
        dev = self.device
        inputs = {
            "token_ids": _host_ints(tokens, "q").to(dev),
            "positions": _host_ints(positions, "q").to(dev),
            "slot_mapping": _host_ints(slots, "q").to(dev),
            "block_tables": _host_ints(tables, "i").view(len(entries), max_blocks).to(dev),
            "seq_lens": _host_ints(lens, "i").to(dev),
            "cu_seqlens_q": _host_ints(cu, "i").to(dev),
            "logits_indices": torch.arange(len(tokens), device=dev) if logits_all else _host_ints(last, "q").to(dev),
            **self.cache.inputs(),
        }
        if has_state_slots:
            inputs["state_slots"] = _host_ints([e.state_slot for e in entries], "q").to(dev)
        with torch.inference_mode():
            if self._executor is None:
                logits = interpreter.run(self.graph, self.weights, inputs, group=self.group)["logits"]
            else:
                meta = StepMeta("decode" if is_decode else "prefill", len(tokens),
                                max(e.end - e.start for e in entries))
                with collectives.use_group(self.group):
                    logits = self._executor.run({**self.weights, **inputs}, meta)["logits"]
            if sampling is None:
                return StepOutput(logits)
            return StepOutput(logits, *sample(logits, sampling))

    def logits(self, token_ids: list[int], block_table: list[int], state_slot: int = -1) -> torch.Tensor:
        """Float32 logits [T, V] on the CPU for every position of one sequence, whose blocks (and state slot,
        for a plan with per-sequence state) are given; in steps of at most max_num_batched_tokens tokens (a
        long prompt is chunked, the state carried from chunk to chunk in the slot)."""
        assert state_slot >= 0 or not self.bytes_per_sequence, "a plan with per-sequence state needs a slot"
        step = self.max_num_batched_tokens
        chunks = [self.execute([StepEntry(token_ids, block_table, start, min(start + step, len(token_ids)),
                                          state_slot)], logits_all=True).logits.cpu()
                  for start in range(0, len(token_ids), step)]
        return torch.cat(chunks)
