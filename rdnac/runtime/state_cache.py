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

from rdnac.errors import RequestError
from rdnac.ir.state import StateSpec, bytes_per_sequence, bytes_per_token

_CPU_LIMIT_BYTES = 256 << 20  # the cpu default pool: room for the batch within this (one full sequence at least)


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


def default_num_blocks(specs: list[StateSpec], block_size: int, num_slots: int, blocks_per_sequence: int,
                       max_num_seqs: int, device: str, gpu_memory_utilization: float, step_bytes: int = 0) -> int:
    """Pages of paged state for a pool, never more than max_num_seqs full-length sequences use: on cuda what
    `gpu_memory_utilization` of the free memory holds once the per-sequence slots and the largest step's
    activations (`step_bytes`, measured by ModelRunner.profile_step_bytes) are paid for; on cpu what
    256 MiB holds, but at least one full-length sequence."""
    per_block = bytes_per_block(specs, block_size)
    slots_bytes = num_slots * bytes_per_sequence(specs)
    useful = max_num_seqs * blocks_per_sequence
    if per_block == 0:  # no paged state: blocks only number positions
        return useful
    if device == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info()
        num_blocks = min(useful, (int(free_bytes * gpu_memory_utilization) - slots_bytes - step_bytes) // per_block)
    else:
        num_blocks = max(blocks_per_sequence, min(useful, (_CPU_LIMIT_BYTES - slots_bytes) // per_block))
    if num_blocks < 1:
        raise RequestError(f"the model state requires at least one block of {per_block} bytes (after {num_slots} "
                           f"sequence slots of {bytes_per_sequence(specs)} bytes and {step_bytes} bytes of step "
                           f"activations); got room for none; free device memory, lower max_num_seqs or "
                           f"max_num_batched_tokens")
    return num_blocks
