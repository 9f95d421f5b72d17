"""Graph passes, one per file. Each is `run(graph, ctx) -> Graph` and logs its decisions in `ctx`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from rdnac.ir.graph import Graph


@dataclass
class PassContext:
    target: str
    options: dict = field(default_factory=dict)
    decisions: list[dict] = field(default_factory=list)

    def decide(self, pass_name: str, node: str, action: str, reason: str) -> None:
        self.decisions.append({"pass": pass_name, "node": node, "action": action, "reason": reason})


# passes in the registry that rewrite weights: called as run(graph, ctx, weights)
WEIGHT_PASSES = ("merge_linears",)


def registry() -> dict[str, Callable[..., Graph]]:
    """Graph passes by name: run(graph, ctx), or run(graph, ctx, weights) for those in WEIGHT_PASSES."""
    from rdnac.compiler.passes import (dce, fuse_act_quant, fuse_add_rms_norm, fuse_attention_quant, fuse_gated_linear,
                                       fuse_norm_quant, fuse_qk_norm_rope_cache, merge_linears)

    return {"merge_linears": merge_linears.run, "fuse_add_rms_norm": fuse_add_rms_norm.run,
            "fuse_qk_norm_rope_cache": fuse_qk_norm_rope_cache.run, "dce": dce.run,
            "fuse_norm_quant": fuse_norm_quant.run, "fuse_act_quant": fuse_act_quant.run,
            "fuse_attention_quant": fuse_attention_quant.run,
            "fuse_gated_linear": fuse_gated_linear.run}
