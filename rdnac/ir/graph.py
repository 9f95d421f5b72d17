"""Graph data structures: one forward step over a flat, ragged token batch.

A graph's runtime inputs are the token batch and its attention metadata
(`token_ids`, `positions`, `slot_mapping`, `block_tables`, `seq_lens`,
`cu_seqlens_q`, `logits_indices`) plus one K and one V cache per layer.
Prefill and decode are the same graph with different metadata. Weights are
constants referenced by name. Dimensions are ints or symbols: `T` tokens in
the batch, `B` sequences, `NB` KV blocks, `MB` max blocks per sequence, `R`
rows of logits requested.

Nodes are stored in execution order. `kv_cache_write` mutates its cache
inputs in place and has no outputs; it must precede the attention that reads
those caches (verify checks this).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rdnac.ir.state import StateSpec

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # torch dtype name without the "torch." prefix: "float32", "int64"
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_dict(d: dict) -> TensorSpec:
        return TensorSpec(d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class WeightSpec:
    dtype: str
    shape: tuple[int, ...]
    scheme: str = "none"  # quantization scheme: "none" for plain float weights
    source: str = ""  # checkpoint tensor(s) it came from, for messages and inspect

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @staticmethod
    def from_dict(d: dict) -> WeightSpec:
        return WeightSpec(d["dtype"], tuple(d["shape"]), d.get("scheme", "none"), d.get("source", ""))


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "attrs": dict(self.attrs)}

    @staticmethod
    def from_dict(d: dict) -> Node:
        return Node(d["name"], d["op"], list(d["inputs"]), list(d["outputs"]), dict(d["attrs"]))


@dataclass
class Graph:
    inputs: dict[str, TensorSpec]
    weights: dict[str, WeightSpec]
    nodes: list[Node]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)  # model-level facts: num_layers, vocab_size...
    state: list[StateSpec] = field(default_factory=list)  # what the runtime allocates (ir/state.py)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def to_dict(self) -> dict:
        return {
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "weights": {k: v.to_dict() for k, v in self.weights.items()},
            "nodes": [n.to_dict() for n in self.nodes],
            "outputs": list(self.outputs),
            "attrs": dict(self.attrs),
            "state": [s.to_dict() for s in self.state],
        }

    @staticmethod
    def from_dict(d: dict) -> Graph:
        return Graph(
            inputs={k: TensorSpec.from_dict(v) for k, v in d["inputs"].items()},
            weights={k: WeightSpec.from_dict(v) for k, v in d["weights"].items()},
            nodes=[Node.from_dict(n) for n in d["nodes"]],
            outputs=list(d["outputs"]),
            attrs=dict(d["attrs"]),
            state=[StateSpec.from_dict(s) for s in d.get("state", [])],
        )

    def dump(self) -> str:
        lines = [f"graph({', '.join(self.inputs)}) -> {', '.join(self.outputs)}"]
        for n in self.nodes:
            attrs = ", ".join(f"{k}={v}" for k, v in n.attrs.items())
            lines.append(f"  {', '.join(n.outputs) or '_'} = {n.op}({', '.join(n.inputs)}) [{attrs}]  # {n.name}")
        return "\n".join(lines)
