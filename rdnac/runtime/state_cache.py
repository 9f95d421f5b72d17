"""The model state a plan declares (`Graph.state`, ir/state.py), allocated on the device.

Paged kinds (per token: paged_kv, paged_latent) are [num_blocks, block_size,
*shape]; a sequence owns a block table and the token at position p lives in
slot block_table[p // block_size] * block_size + p % block_size. Per-sequence
kinds (recurrent, conv) are [num_slots, *shape], one slot per running
sequence. Sizes come from the declared specs only: nothing here knows heads
or head dims.
"""

from __future__ import annotations

import torch

from rdnac.ir.state import StateSpec, bytes_per_sequence, bytes_per_token


class StateCache:
    def __init__(self, specs: list[StateSpec], num_blocks: int, block_size: int, num_slots: int, device: str):
        assert num_blocks > 0 and block_size > 0 and num_slots >= 0
        self.specs = specs
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        self.tensors: dict[str, torch.Tensor] = {}
        for s in specs:
            shape = (num_blocks, block_size, *s.shape) if s.is_paged else (num_slots, *s.shape)
            self.tensors[s.name] = torch.zeros(shape, dtype=getattr(torch, s.dtype), device=device)

    def inputs(self) -> dict[str, torch.Tensor]:
        return self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def bytes_per_block(specs: list[StateSpec], block_size: int) -> int:
    return block_size * bytes_per_token(specs)


def has_sequence_state(specs: list[StateSpec]) -> bool:
    return bytes_per_sequence(specs) > 0
