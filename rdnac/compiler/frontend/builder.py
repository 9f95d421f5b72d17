"""A small graph builder that family files write against, with strict coverage.

Every checkpoint tensor must be consumed by `weight()` or ignored with a
reason by `ignore()`; `finish()` fails listing the rest. Shapes are checked
when a weight is taken, dtype is converted to the plan's compute dtype.
"""

from __future__ import annotations

import re

import torch

from rdnac.compiler.frontend.checkpoint import Checkpoint
from rdnac.errors import CheckpointError
from rdnac.ir.graph import Graph, Node, TensorSpec, WeightSpec

_FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}


class GraphBuilder:
    def __init__(self, checkpoint: Checkpoint, dtype: str):
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.inputs: dict[str, TensorSpec] = {}
        self.weight_specs: dict[str, WeightSpec] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.nodes: list[Node] = []
        self.decisions: list[dict] = []
        self._consumed: set[str] = set()
        self._ignored: dict[str, str] = {}
        self._names = set(checkpoint.tensors.names())

    def has(self, name: str) -> bool:
        return name in self._names

    def input(self, name: str, dtype: str, shape: tuple) -> str:
        self.inputs[name] = TensorSpec(dtype, tuple(shape))
        return name

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        """Take checkpoint tensor `name` as a graph weight of `shape` in the compute dtype."""
        if name not in self._names:
            raise CheckpointError(f"{self.checkpoint.path}: missing tensor {name!r} (shape {list(shape)}) "
                                  "required by the model config")
        src_dtype, src_shape = self.checkpoint.tensors.spec(name)
        if tuple(src_shape) != tuple(shape):
            raise CheckpointError(f"{self.checkpoint.path}: tensor {name!r} requires shape {list(shape)} "
                                  f"from config.json; got {list(src_shape)}")
        if src_dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{self.checkpoint.path}: tensor {name!r} requires a float dtype; got {src_dtype}")
        self._consumed.add(name)
        if name not in self.weights:
            self.weights[name] = self.checkpoint.tensors.load(name).to(getattr(torch, self.dtype)).contiguous()
            self.weight_specs[name] = WeightSpec(self.dtype, tuple(shape), "none", source=name)
        return name

    def ignore(self, pattern: str, reason: str) -> None:
        """Mark checkpoint tensors matching regex `pattern` as deliberately unused."""
        for name in self._names:
            if re.fullmatch(pattern, name):
                self._ignored[name] = reason

    def node(self, op: str, inputs: list[str], name: str, num_outputs: int = 1, **attrs) -> list[str]:
        outputs = [name] if num_outputs == 1 else [f"{name}.{i}" for i in range(num_outputs)]
        self.nodes.append(Node(name, op, list(inputs), outputs, attrs))
        return outputs

    def decide(self, node: str, action: str, reason: str) -> None:
        self.decisions.append({"pass": "frontend", "node": node, "action": action, "reason": reason})

    def finish(self, outputs: list[str], attrs: dict) -> tuple[Graph, dict[str, torch.Tensor]]:
        unused = sorted(self._names - self._consumed - set(self._ignored))
        if unused:
            shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
            raise CheckpointError(f"{self.checkpoint.path}: {len(unused)} checkpoint tensor(s) not used by the "
                                  f"{attrs.get('architecture')} graph: {shown}; the checkpoint does not match its config")
        for name, reason in sorted(self._ignored.items()):
            self.decisions.append({"pass": "frontend", "node": name, "action": "ignored tensor", "reason": reason})
        graph = Graph(self.inputs, self.weight_specs, self.nodes, outputs, attrs)
        return graph, self.weights
