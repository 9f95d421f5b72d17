"""The MoE feed-forward with a gated shared expert (Qwen3-Next, Qwen3.5-MoE): routed experts plus one
dense expert every token takes, scaled by a per-token sigmoid gate.

    routed = MoE(x)                                            (moe.py)
    shared = down(act(gate_proj(x)) * up_proj(x)) * sigmoid(shared_expert_gate(x))   # gate [T, 1]
    out = routed + shared
"""

from __future__ import annotations

from dataclasses import dataclass

from rdnac.compiler.frontend.blocks import Model
from rdnac.compiler.frontend.moe import MoE
from rdnac.compiler.frontend.spec import config_file
from rdnac.errors import UnsupportedModelError


@dataclass(frozen=True)
class SharedExpertMoE:
    routed: MoE
    intermediate_key: str = "shared_expert_intermediate_size"
    module: str = "mlp"

    def emit(self, m: Model, x: str, layer: int) -> str:
        b = m.b
        p, n = f"model.layers.{layer}.{self.module}", f"layers.{layer}"
        inter = m.config.get(self.intermediate_key)
        if not isinstance(inter, int) or inter < 1:
            raise UnsupportedModelError(f"{config_file(b.checkpoint.path)}: {self.intermediate_key} requires a "
                                        f"positive integer (the shared expert's size); got {inter!r}")
        routed = self.routed.emit(m, x, layer)
        g = b.linear(x, f"{p}.shared_expert.gate_proj", inter, m.hidden, False, f"{n}.shared_expert.gate_proj")
        u = b.linear(x, f"{p}.shared_expert.up_proj", inter, m.hidden, False, f"{n}.shared_expert.up_proj")
        a = b.node("gated_act", [g, u], f"{n}.shared_expert.act", act=m.act)[0]
        shared = b.linear(a, f"{p}.shared_expert.down_proj", m.hidden, inter, False, f"{n}.shared_expert.down_proj")
        gate = b.linear(x, f"{p}.shared_expert_gate", 1, m.hidden, False, f"{n}.shared_expert_gate")
        shared = b.node("sigmoid_gate", [shared, gate], f"{n}.shared_expert.gated")[0]
        return b.node("add", [routed, shared], f"{n}.experts_sum")[0]
