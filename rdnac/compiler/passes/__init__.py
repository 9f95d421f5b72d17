"""Compile passes, one per file, all of one signature: `run(state: CompileState) -> None`.

A pass reads and rewrites the one `CompileState` of a compile (graph,
weights, the target resolved once, its probed capabilities, the compile
options) and logs each decision with `state.decide`. `rdnac.compiler.pipeline`
runs them in order (`PASSES` there); tests run one on a state of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from rdnac.ir.graph import Graph
from rdnac.targets import Target, get_target

if TYPE_CHECKING:
    from rdnac.compiler.pipeline import CompileOptions


@dataclass
class CompileState:
    """What a compile carries from pass to pass, and what the plan is written from."""

    graph: Graph
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> tensor, rewritten by weight passes
    target: Target | str = "cpu"  # a name is resolved once, here
    options: CompileOptions | None = None  # None: the defaults for `target`
    capabilities: Any = None  # rdnac.targets.probe.Capabilities, probed once for a GPU target
    decisions: list[dict] = field(default_factory=list)  # the plan's decision log
    runtime: dict = field(default_factory=dict)  # the plan's runtime defaults (KV block size, PDL, ...)
    program: dict = field(default_factory=dict)  # node -> step key -> {"kernel", "config"}: select_kernels
    binaries: list = field(default_factory=list)  # KernelBinary per specialization: select_kernels
    kv_scales: dict = field(default_factory=dict)  # layer -> (k_scale, v_scale) a checkpoint carries (kv_cache_dtype)
    rank_weights: list = field(default_factory=list)  # --tp N: each rank's weights (rank 0's is `weights`): shard

    def __post_init__(self) -> None:
        self.target = get_target(self.target)
        if self.options is None:
            from rdnac.compiler.pipeline import CompileOptions

            self.options = CompileOptions(target=self.target.name)

    def decide(self, pass_name: str, node: str, action: str, reason: str) -> None:
        self.decisions.append({"pass": pass_name, "node": node, "action": action, "reason": reason})


Pass = Callable[[CompileState], None]
