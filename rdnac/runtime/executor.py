"""Run a GPU plan's program: each graph node through its chosen kernel wrapper.

The plan's program maps every node to a kernel wrapper, by name
("gemm.linear", resolved only through `rdnac.kernels.registry`), and a config
per step key (`phase:bucket`, see `step_key`). The same executor runs over
real GPU tensors with the plan's precompiled binaries (AotLauncher), over CPU
tensors under the Triton interpreter (`--interpret`), and over meta tensors
with a recording launcher when the compiler collects the specializations a
plan needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rdnac.errors import PlanError
from rdnac.ir.graph import Graph
from rdnac.kernels import registry

# Token-count buckets: a step with T tokens uses the configs of the smallest bucket >= T.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
PHASES = registry.PHASES


def bucket_for(num_tokens: int) -> int:
    for b in BUCKETS:
        if num_tokens <= b:
            return b
    raise ValueError(f"a step of {num_tokens} tokens exceeds the largest bucket {BUCKETS[-1]}")


def step_key(phase: str, num_tokens: int) -> str:
    return f"{phase}:{bucket_for(num_tokens)}"


@dataclass
class StepMeta:
    """Host-side facts of a step that launch grids need (never read back from the device)."""
    phase: str
    num_tokens: int
    max_query_len: int


class Executor:
    def __init__(self, graph: Graph, program: dict, launcher, device: str | torch.device):
        self.graph = graph
        self.program = program  # node name -> {step key -> {"kernel": wrapper name, "config": {...}}}
        self.launcher = launcher
        self._wrappers: dict[str, object] = {}
        # Each node's wrapper keywords, built once: its attrs plus what its op's record adds (RoPE tables).
        self._kwargs: dict[str, dict] = {}
        self._takes_max_query_len: set[str] = set()  # nodes whose prefill grid is bounded by the longest query
        for node in graph.nodes:
            self._kwargs[node.name] = dict(node.attrs)
            if node.op in registry.VIEW_OPS:
                continue
            if not registry.has_kernel(node.op):
                raise PlanError(f"node {node.name!r}: a GPU plan requires a kernel for every op; rdnac's kernel "
                                f"library has none for op {node.op!r}; do run this plan on the cpu target")
            entry = registry.for_op(node.op)[1]
            if entry.node_kwargs is not None:
                self._kwargs[node.name].update(entry.node_kwargs(node.attrs, device))
            if entry.takes_max_query_len:
                self._takes_max_query_len.add(node.name)
        # Every wrapper the program names is resolved now, at load: a plan naming one outside rdnac's kernel
        # library fails before it serves anything, not as a failed step of the first request.
        for choices in program.values():
            for choice in choices.values():
                self._wrapper(choice["kernel"])

    def _wrapper(self, name: str):
        fn = self._wrappers.get(name)
        if fn is None:
            fn = self._wrappers[name] = registry.wrapper(name)
        return fn

    def run(self, env: dict[str, torch.Tensor], meta: StepMeta, on_node=None) -> dict[str, torch.Tensor]:
        """Execute every node; `env` holds weights and graph inputs and receives all values.

        `on_node(node)` is called before each node runs (the compiler uses it to
        attribute recorded launches to nodes)."""
        key = step_key(meta.phase, meta.num_tokens)
        for node in self.graph.nodes:
            if on_node is not None:
                on_node(node)
            if node.op == "split":  # registry.VIEW_OPS: column views, no copy
                for name, value in zip(node.outputs, torch.split(env[node.inputs[0]], node.attrs["sizes"], dim=1)):
                    env[name] = value
                continue
            choice = self.program[node.name][key]
            kwargs = self._kwargs[node.name]
            if meta.phase == "prefill" and node.name in self._takes_max_query_len:
                kwargs = {**kwargs, "max_query_len": meta.max_query_len}
            result = self._wrapper(choice["kernel"])(*(env[n] for n in node.inputs), **kwargs,
                                                     config=choice["config"], launcher=self.launcher)
            if isinstance(result, torch.Tensor):
                result = (result,)
            for name, value in zip(node.outputs, result or ()):
                env[name] = value
        return {name: env[name] for name in self.graph.outputs}
