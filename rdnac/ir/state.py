"""Model state a plan declares: what the runtime allocates and the block manager budgets.

A graph lists its state as `StateSpec`s (`Graph.state`), one per state
tensor, each naming the graph input it feeds. The runtime allocates from this
list only; nothing outside it assumes `num_kv_heads x head_dim`.

| kind          | per      | allocated as                     | used by                      |
|---------------|----------|----------------------------------|------------------------------|
| paged_kv      | token    | [num_blocks, block_size, *shape] | K and V caches of attention  |
| paged_latent  | token    | [num_blocks, block_size, *shape] | MLA's compressed latent cache|
| recurrent     | sequence | [num_slots, *shape]              | linear-attention state       |
| conv          | sequence | [num_slots, *shape]              | causal conv1d rolling state  |

Paged state is addressed through `slot_mapping` / `block_tables`; per-sequence
state through one slot per running sequence (`state_slots`, [B]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = {"paged_kv": "token", "paged_latent": "token", "recurrent": "sequence", "conv": "sequence"}

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e4m3fnuz": 1,
             "int8": 1, "uint8": 1}


class UnknownStateError(ValueError):
    """A declared state kind this rdnac does not know (a plan from a newer rdnac, or a corrupt one)."""


@dataclass(frozen=True)
class StateSpec:
    name: str  # the graph input it feeds: "k_cache.3"
    kind: str  # a key of KINDS
    layer: int
    dtype: str  # torch dtype name without "torch."
    shape: tuple[int, ...]  # per token (paged kinds) or per sequence

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnknownStateError(f"state {self.name!r} (layer {self.layer}) has kind {self.kind!r}; this rdnac "
                                    f"knows {', '.join(KINDS)}; recompile the plan with this rdnac or upgrade rdnac")
        if self.dtype not in _ITEMSIZE:
            raise UnknownStateError(f"state {self.name!r} has dtype {self.dtype!r}; supported: {', '.join(_ITEMSIZE)}")
        assert all(isinstance(d, int) and d > 0 for d in self.shape), self

    @property
    def per(self) -> str:
        """"token" (paged: grows with the sequence) or "sequence" (fixed size per running sequence)."""
        return KINDS[self.kind]

    @property
    def is_paged(self) -> bool:
        return self.per == "token"

    @property
    def nbytes(self) -> int:
        """Bytes per token (paged) or per sequence."""
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]

    def graph_shape(self) -> tuple:
        """The graph input's symbolic shape: NB blocks of BS tokens, or NS sequence slots."""
        return ("NB", "BS", *self.shape) if self.is_paged else ("NS", *self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "dtype": self.dtype,
                "shape": list(self.shape)}

    @staticmethod
    def from_dict(d: dict) -> StateSpec:
        return StateSpec(d["name"], d["kind"], int(d["layer"]), d["dtype"], tuple(int(x) for x in d["shape"]))


def bytes_per_token(state: list[StateSpec]) -> int:
    return sum(s.nbytes for s in state if s.is_paged)


def bytes_per_sequence(state: list[StateSpec]) -> int:
    return sum(s.nbytes for s in state if not s.is_paged)
