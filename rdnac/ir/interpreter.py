"""Run a graph with the torch reference of each op (the IR's living definition).

The cpu runtime device uses this to execute plans; tests use it as the
reference for kernels and passes.
"""

from __future__ import annotations

import torch

from rdnac.ir import collectives
from rdnac.ir.graph import Graph
from rdnac.ir.ops import OPS


def run(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
        keep: tuple[str, ...] = (), group=None) -> dict[str, torch.Tensor]:
    """Execute `graph`; returns its outputs and any value named in `keep`.

    `inputs` holds every graph input, KV caches included (mutated in place). `group`: the
    torch.distributed process group a sharded plan's collectives run on (None: one rank)."""
    with collectives.use_group(group):
        return _run(graph, weights, inputs, keep)


def _run(graph: Graph, weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
         keep: tuple[str, ...]) -> dict[str, torch.Tensor]:
    missing = [name for name in graph.inputs if name not in inputs]
    assert not missing, f"graph inputs not provided: {missing}"
    env: dict[str, torch.Tensor] = {**weights, **inputs}
    kept: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        args = [env[name] for name in node.inputs]
        result = OPS[node.op].reference(*args, **node.attrs)
        if isinstance(result, torch.Tensor):
            result = (result,)
        for name, value in zip(node.outputs, result or ()):
            env[name] = value
            if name in keep:
                kept[name] = value
    return {**kept, **{name: env[name] for name in graph.outputs}}
