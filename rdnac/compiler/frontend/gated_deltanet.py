"""The Gated DeltaNet body (linear attention of Qwen3.5 / Qwen3-Next layers), a block builder like blocks.py's.

    qkv = in_proj_qkv(x); z = in_proj_z(x); b = in_proj_b(x); a = in_proj_a(x)
    q, k, v = split(causal_conv1d(qkv))              # conv state: per sequence, [C, K-1], the model's dtype
    o = gated_delta_rule(q, k, v, a, b, A_log, dt_bias)  # recurrent state: per sequence, [Hv, Dk, Dv], float32
    out_proj(gated_rms_norm(o, z))

The ops are defined in `rdnac.ir.linear_attention`; both states are declared
with `GraphBuilder.state_input` and addressed through the `state_slots` step
input, one slot per running sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rdnac.compiler.frontend.blocks import Model
from rdnac.compiler.frontend.spec import config_file
from rdnac.errors import UnsupportedModelError
from rdnac.ir.linear_attention import CONV_KERNEL_SIZES

_CONV_ACTIVATIONS = {"silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class GdnDims:
    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.k_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.v_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


def gdn_dims(c: dict, path) -> GdnDims:
    """The linear-attention dims of config.json, checked against what a plan can hold."""
    dims = GdnDims(c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                   c["linear_value_head_dim"], c["linear_conv_kernel_dim"])
    if dims.conv_kernel not in CONV_KERNEL_SIZES:
        raise UnsupportedModelError(
            f"{config_file(path)}: linear_conv_kernel_dim requires {CONV_KERNEL_SIZES.start}.."
            f"{CONV_KERNEL_SIZES.stop - 1} (the plan's conv state holds kernel-1 inputs per channel, and the GDN "
            f"conv kernels cover those widths); got {dims.conv_kernel}")
    if dims.num_v_heads % dims.num_k_heads:
        raise UnsupportedModelError(f"{config_file(path)}: linear_num_value_heads requires a multiple of "
                                    f"linear_num_key_heads ({dims.num_k_heads}); got {dims.num_v_heads}")
    return dims


@dataclass(frozen=True)
class GatedDeltaNet:
    """Linear attention with the gated delta rule; declares its layer's conv and recurrent state."""

    chunk_size: int = 64  # transformers' chunked fallback's block: chunks are counted the same way
    # Qwen3-Next: in_proj_qkvz and in_proj_ba, rows grouped per key head; else in_proj_qkv/_z/_b/_a (Qwen3.5)
    fused_projections: bool = False

    def emit(self, m: Model, x: str, layer: int) -> str:
        b, c = m.b, m.config
        p, n = f"model.layers.{layer}.linear_attn", f"layers.{layer}"
        d = gdn_dims(c, b.checkpoint.path)
        act = _CONV_ACTIVATIONS.get(c.get("hidden_act", "silu"))
        if act is None:
            raise UnsupportedModelError(f"{config_file(b.checkpoint.path)}: hidden_act (the GDN conv's activation) "
                                        f"requires silu; got {c.get('hidden_act')!r}")
        if self.fused_projections:
            qkv, z, beta_logit, a = (b.node("linear", [x, w], f"{n}.{leaf}")[0]
                                     for leaf, w in zip(("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),
                                                        split_fused_projections(m, p, d)))
        else:
            qkv = b.linear(x, f"{p}.in_proj_qkv", d.conv_dim, m.hidden, False, f"{n}.in_proj_qkv")
            z = b.linear(x, f"{p}.in_proj_z", d.value_dim, m.hidden, False, f"{n}.in_proj_z")
            beta_logit = b.linear(x, f"{p}.in_proj_b", d.num_v_heads, m.hidden, False, f"{n}.in_proj_b")
            a = b.linear(x, f"{p}.in_proj_a", d.num_v_heads, m.hidden, False, f"{n}.in_proj_a")

        if "state_slots" not in b.inputs:
            b.decide("state", "prefix caching off", "linear attention keeps per-sequence state, which a cached "
                     "prefix of KV blocks cannot restore; the runtime refuses enable_prefix_caching for this plan")
        slots = b.input("state_slots", "int64", ("B",))
        s = m.step
        conv_state = b.state_input(f"conv_state.{layer}", "conv", layer, m.dtype, (d.conv_dim, d.conv_kernel - 1))
        conv_weight = b.derived_weight(f"{p}.conv1d.weight", [(f"{p}.conv1d.weight", (d.conv_dim, 1, d.conv_kernel))],
                                       lambda t: t[0].reshape(d.conv_dim, d.conv_kernel), (d.conv_dim, d.conv_kernel),
                                       "reshape [C, 1, K] to [C, K]")
        qkv = b.node("causal_conv1d", [qkv, conv_weight, conv_state, slots, s["seq_lens"], s["cu_seqlens_q"]],
                     f"{n}.conv1d", kernel_size=d.conv_kernel, activation=act)[0]
        q, k, v = b.node("split", [qkv], f"{n}.qkv_split", 3, sizes=[d.key_dim, d.key_dim, d.value_dim])

        state = b.state_input(f"recurrent_state.{layer}", "recurrent", layer, "float32",
                              (d.num_v_heads, d.k_head_dim, d.v_head_dim))
        # in the compute dtype, as transformers holds the parameter; the op computes exp(A_log) in float32
        a_log = b.weight(f"{p}.A_log", (d.num_v_heads,))
        dt_bias = b.weight(f"{p}.dt_bias", (d.num_v_heads,))
        o = b.node("gated_delta_rule", [q, k, v, a, beta_logit, a_log, dt_bias, state, slots, s["seq_lens"],
                                        s["cu_seqlens_q"]], f"{n}.gdn",
                   num_k_heads=d.num_k_heads, num_v_heads=d.num_v_heads, k_head_dim=d.k_head_dim,
                   v_head_dim=d.v_head_dim, chunk_size=self.chunk_size)[0]
        norm_weight = b.weight(f"{p}.norm.weight", (d.v_head_dim,))
        o = b.node("gated_rms_norm", [o, z, norm_weight], f"{n}.gdn_norm", num_heads=d.num_v_heads,
                   head_dim=d.v_head_dim, eps=m.eps, act="silu")[0]
        return b.linear(o, f"{p}.out_proj", m.hidden, d.value_dim, False, f"{n}.out_proj")



def split_fused_projections(m: Model, p: str, d: GdnDims) -> list[str]:
    """Qwen3-Next's in_proj_qkvz [2Kd + 2Vd, H] holds per key head h its rows [q_h (Dk), k_h (Dk), v (r*Dv),
    z (r*Dv)] for the r = Hv/Hk value heads h serves, and in_proj_ba [2Hv, H] per key head [b (r), a (r)].
    Regrouped once into Qwen3.5's four weights (in_proj_qkv: all q, all k, all v; in_proj_z, in_proj_b,
    in_proj_a), value heads in the order h*r + j both models use, so the rest of the body is shared."""
    b, hidden, hk, r = m.b, m.hidden, d.num_k_heads, d.num_v_heads // d.num_k_heads
    qkvz = (f"{p}.in_proj_qkvz.weight", (2 * d.key_dim + 2 * d.value_dim, hidden))
    ba = (f"{p}.in_proj_ba.weight", (2 * d.num_v_heads, hidden))
    widths = [d.k_head_dim, d.k_head_dim, r * d.v_head_dim, r * d.v_head_dim]

    def parts(t, sizes: list[int]):  # [Hk * sum(sizes), H] -> per part [Hk * size, H], key-head major
        return [x.reshape(-1, hidden) for x in t.view(hk, sum(sizes), hidden).split(sizes, dim=1)]

    how = "regroup per-key-head rows"
    out = [b.derived_weight(f"{p}.in_proj_qkv.weight", [qkvz], lambda t: torch.cat(parts(t[0], widths)[:3]),
                            (d.conv_dim, hidden), how),
           b.derived_weight(f"{p}.in_proj_z.weight", [qkvz], lambda t: parts(t[0], widths)[3],
                            (d.value_dim, hidden), how),
           b.derived_weight(f"{p}.in_proj_b.weight", [ba], lambda t: parts(t[0], [r, r])[0],
                            (d.num_v_heads, hidden), how),
           b.derived_weight(f"{p}.in_proj_a.weight", [ba], lambda t: parts(t[0], [r, r])[1],
                            (d.num_v_heads, hidden), how)]
    b.decide(f"{p}.in_proj_qkvz", "split into in_proj_qkv and in_proj_z; in_proj_ba into in_proj_b and in_proj_a",
             "rows grouped per key head in the checkpoint, regrouped once so the conv reads q, k, v contiguous")
    return out
