"""Continuous batching with chunked prefill over a fixed pool of KV blocks.

Each step the scheduler picks token ranges for the model runner
(`ModelRunner.execute`): first one token for every running sequence that is
decoding, then prefill chunks (of sequences part-way through their prompt,
then of waiting ones, oldest first) within the token budget. A step is thus
all-decode (one token per entry, at most max_num_seqs entries) or holds at
most max_num_batched_tokens tokens, the two shapes a plan supports.

A waiting sequence is admitted only when blocks for all its tokens (and, for
a plan with per-sequence state, a state slot) fit, so a full pool queues
requests instead of failing. When a decoding sequence needs
a block and none is free, the newest running sequence is preempted by
recompute: its blocks are freed and it goes back to the front of the queue
with prompt + generated tokens, to be prefilled again later. Its generated
tokens stay in `token_ids`, so nothing already streamed is lost or repeated.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from rdnac.runtime.block_manager import BlockManager
from rdnac.runtime.sequence import Sequence, SequenceStatus

__all__ = ["ScheduledChunk", "Scheduler", "Sequence", "SequenceStatus"]


@dataclass
class ScheduledChunk:
    """Tokens [start, end) of `seq.token_ids` run in this step."""
    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        """The chunk ends at the sequence's last token: its logits give the next token."""
        return self.end == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        assert max_num_seqs > 0 and max_num_batched_tokens > 0
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.status == SequenceStatus.WAITING and not seq.block_table
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        has_preempted = False

        # Decodes: one token each. Growing a sequence may need a block; preempt the newest to get one.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            assert seq.num_computed_tokens < seq.num_tokens
            if seq.num_tokens - seq.num_computed_tokens > 1:
                i += 1
                continue
            while not self.block_manager.can_append(seq.block_table, seq.num_tokens):
                victim = self.running[-1]  # never one scheduled already: those sit before index i
                self._preempt(victim)
                has_preempted = True
                if victim is seq:
                    break
            else:
                self.block_manager.append(seq.block_table, seq.num_tokens)
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, seq.num_tokens))
                i += 1
        budget -= len(chunks)  # may go negative: an all-decode step is bounded by max_num_seqs only

        # Prefill chunks of sequences already admitted (their blocks are allocated).
        for seq in self.running:
            if budget <= 0:
                break
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1:
                take = min(remaining, budget)
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, seq.num_computed_tokens + take))
                budget -= take

        # Admit waiting sequences, oldest first, while their blocks fit. Not after a preemption:
        # the pool is short, and admitting would only preempt again.
        while self.waiting and not has_preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq.token_ids):
                break
            self.waiting.popleft()
            seq.block_table, seq.num_computed_tokens = self.block_manager.allocate(seq.token_ids)
            seq.state_slot = self.block_manager.take_slot()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            take = min(seq.num_tokens - seq.num_computed_tokens, budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, seq.num_computed_tokens + take))
            budget -= take
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        self.block_manager.free_slot(seq.state_slot)
        seq.state_slot = -1
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, chunks: list[ScheduledChunk]) -> None:
        """Record that the step ran: its tokens' KV is now in the cache."""
        for c in chunks:
            assert c.start == c.seq.num_computed_tokens
            c.seq.num_computed_tokens = c.end
            self.block_manager.cache_full_blocks(c.seq.block_table, c.seq.token_ids, c.end)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (done or aborted) and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        self.block_manager.free_slot(seq.state_slot)
        seq.state_slot = -1
        seq.status = SequenceStatus.FINISHED
