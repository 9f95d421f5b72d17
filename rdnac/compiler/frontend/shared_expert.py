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
    """Routed experts plus a shared expert. DeepSeek's variant (`shared="shared_experts"`, `gate=None`,
    `multiplier_key="n_shared_experts"`): no gate, and the shared MLP is n_shared_experts experts wide
    (intermediate moe_intermediate_size * n_shared_experts)."""

    routed: MoE
    intermediate_key: str = "shared_expert_intermediate_size"
    module: str = "mlp"
    shared: str = "shared_expert"  # the shared MLP's module leaf
    gate: str | None = "shared_expert_gate"  # the per-token sigmoid gate's module leaf; None: ungated
    multiplier_key: str | None = None  # the shared size is intermediate_key's value times this key's

    def emit(self, m: Model, x: str, layer: int) -> str:
        b = m.b
        p, n = f"model.layers.{layer}.{self.module}", f"layers.{layer}"
        inter = m.config.get(self.intermediate_key)
        if self.multiplier_key and isinstance(inter, int):
            count = m.config.get(self.multiplier_key)
            if not isinstance(count, int) or count < 1:
                raise UnsupportedModelError(f"{config_file(b.checkpoint.path)}: {self.multiplier_key} requires a "
                                            f"positive integer (the shared experts); got {count!r}")
            inter *= count
        if not isinstance(inter, int) or inter < 1:
            raise UnsupportedModelError(f"{config_file(b.checkpoint.path)}: {self.intermediate_key} requires a "
                                        f"positive integer (the shared expert's size); got {inter!r}")
        routed = self.routed.emit(m, x, layer)
        s, sn = f"{p}.{self.shared}", f"{n}.{self.shared}"
        g = b.linear(x, f"{s}.gate_proj", inter, m.hidden, False, f"{sn}.gate_proj")
        u = b.linear(x, f"{s}.up_proj", inter, m.hidden, False, f"{sn}.up_proj")
        a = b.node("gated_act", [g, u], f"{sn}.act", act=m.act)[0]
        shared = b.linear(a, f"{s}.down_proj", m.hidden, inter, False, f"{sn}.down_proj")
        if self.gate:
            gate = b.linear(x, f"{p}.{self.gate}", 1, m.hidden, False, f"{n}.{self.gate}")
            shared = b.node("sigmoid_gate", [shared, gate], f"{sn}.gated")[0]
        return b.node("add", [routed, shared], f"{n}.experts_sum")[0]
