"""Sequence: one request's tokens and where its state lives, as the scheduler and block manager see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0  # tokens whose state is in the cache
    block_table: list[int] = field(default_factory=list)  # pages of the paged state
    state_slot: int = -1  # slot of the per-sequence state (-1: none held, or the plan has none)
    status: SequenceStatus = SequenceStatus.WAITING

    def __post_init__(self):
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
