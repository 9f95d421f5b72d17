"""Paged KV cache: fixed-size blocks handed out by a free-list allocator.

Caches are one K and one V tensor per layer, [num_blocks, block_size, Hk, D].
A sequence owns a list of blocks (its block table); token at position p
lives in slot block_table[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

import torch


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self._free), f"KV pool exhausted: asked for {n} blocks, {len(self._free)} free"
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_blocks)

    def inputs(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            out[f"k_cache.{i}"], out[f"v_cache.{i}"] = k, v
        return out

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
