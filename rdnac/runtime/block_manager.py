"""Ref-counted state pages and per-sequence state slots for the serving scheduler.

A sequence owns a block table: block i holds its tokens [i*BS, (i+1)*BS).
Blocks are ref-counted so that, with prefix caching on, a full block whose
KV has been computed can be shared by every sequence whose tokens start with
the same prefix. A full block is keyed by a hash chain: hash(previous block's
hash, this block's token ids), so equal keys mean equal whole prefixes.
Freed blocks keep their key until the block is reused (least recently freed
first), so a later request, or a preempted one coming back, can hit them.
With prefix caching off nothing is hashed and nothing is shared.

A plan with per-sequence state (ir/state.py: recurrent, conv) also has a
fixed number of state slots: a sequence holds one while it runs, so no more
sequences run at once than there are slots.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def chain_hash(prev: bytes, token_ids: list[int]) -> bytes:
    return hashlib.blake2b(prev + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False, num_slots: int = 0):
        """`num_slots`: per-sequence state slots (0: the plan keeps no per-sequence state, nothing to budget)."""
        assert num_blocks > 0 and block_size > 0 and num_slots >= 0
        self.num_slots = num_slots
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self.num_total_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self.num_cache_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached-but-unused blocks count as free: they are evicted on demand)."""
        return len(self._free)

    # ------------------------------------------------------------ prefix cache

    def _cached_prefix(self, token_ids: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of `token_ids`. The last token is never a hit, so a
        sequence always computes at least one token (its logits give the next token) and never
        writes into a shared block."""
        if not self.enable_prefix_caching:
            return []
        bs, prev, hits = self.block_size, b"", []
        for i in range((len(token_ids) - 1) // bs):
            tokens = token_ids[i * bs:(i + 1) * bs]
            prev = chain_hash(prev, tokens)
            block = self.hash_to_block.get(prev)
            if block is None or self.block_tokens[block] != tuple(tokens):
                break
            hits.append(block)
        return hits

    def cache_full_blocks(self, block_table: list[int], token_ids: list[int], num_computed_tokens: int) -> None:
        """Key the full blocks whose KV is now computed, so later sequences can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first = num_full = min(num_computed_tokens // bs, len(block_table))
        while first > 0 and self.block_hashes[block_table[first - 1]] is None:
            first -= 1
        prev = self.block_hashes[block_table[first - 1]] if first else b""
        for i in range(first, num_full):
            block, tokens = block_table[i], token_ids[i * bs:(i + 1) * bs]
            prev = chain_hash(prev, tokens)
            self.block_hashes[block], self.block_tokens[block] = prev, tuple(tokens)
            self.hash_to_block.setdefault(prev, block)  # an equal block computed earlier keeps the key

    # ------------------------------------------------------------ allocation

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self.block_hashes[block]
        if key is not None:  # evict it from the prefix cache
            if self.hash_to_block.get(key) == block:
                del self.hash_to_block[key]
            self.block_hashes[block] = self.block_tokens[block] = None
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def can_allocate(self, token_ids: list[int]) -> bool:
        if self.num_slots and not self._free_slots:
            return False
        hits = self._cached_prefix(token_ids)
        num_new = blocks_for(len(token_ids), self.block_size) - len(hits)
        return num_new + sum(self.ref_counts[b] == 0 for b in hits) <= len(self._free)

    def allocate(self, token_ids: list[int]) -> tuple[list[int], int]:
        """Blocks for all of `token_ids`; returns (block table, number of leading tokens already cached)."""
        assert self.can_allocate(token_ids), "allocate() called without can_allocate()"
        hits = self._cached_prefix(token_ids)
        table = list(hits)
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
        table += [self._take_free() for _ in range(blocks_for(len(token_ids), self.block_size) - len(table))]
        num_cached = len(hits) * self.block_size
        self.num_cache_hit_tokens += num_cached
        return table, num_cached

    def take_slot(self) -> int:
        """A per-sequence state slot (-1 if the plan has no per-sequence state)."""
        if not self.num_slots:
            return -1
        assert self._free_slots, "take_slot() called without can_allocate()"
        return self._free_slots.pop()

    def free_slot(self, slot: int) -> None:
        if slot >= 0:
            assert slot not in self._free_slots, f"state slot {slot} freed twice"
            self._free_slots.append(slot)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def take_blocks(self, num_blocks: int) -> list[int]:
        """Fresh blocks outside the prefix cache (for a one-off forward pass); free them with `free`."""
        if num_blocks > len(self._free):
            from rdnac.errors import RequestError

            raise RequestError(f"a forward pass requires {num_blocks} free KV blocks; got {len(self._free)} free of "
                               f"{self.num_total_blocks}; let running requests finish or raise num_blocks")
        return [self._take_free() for _ in range(num_blocks)]

    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        return blocks_for(num_tokens, self.block_size) - len(block_table) <= len(self._free)

    def append(self, block_table: list[int], num_tokens: int) -> None:
        """Grow `block_table` in place to hold `num_tokens` tokens."""
        while len(block_table) < blocks_for(num_tokens, self.block_size):
            block_table.append(self._take_free())

    def free(self, block_table: list[int]) -> None:
        # Tail blocks first: a later sequence can only hit a prefix, so the tail is least useful.
        for block in reversed(block_table):
            assert self.ref_counts[block] > 0, f"block {block} freed twice"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
        block_table.clear()
