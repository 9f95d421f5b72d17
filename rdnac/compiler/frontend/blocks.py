"""Reusable block builders that `ModelSpec`s compose: embeddings, norms, attention, dense MLP, head.

A layer is a sequence of blocks (spec.py `ModelSpec.layer`): today a
`Residual(Attention())` mixer and a `Residual(GatedMLP())` feed-forward.
A block emits IR nodes through the `GraphBuilder` and returns the new
hidden state; a body (Attention, GatedMLP, or MoE in moe.py) maps a
normalized hidden state to its output, and `Residual` wraps it in its
norms and the residual add. Linear-attention or MLA bodies slot in the
same way, declaring their own state with `GraphBuilder.state_input`.

Checkpoint names are canonical text-model names (`model.layers.N.<module>`);
node names are `layers.N.<leaf>`. The residual adds are emitted unfused;
the fuse_add_rms_norm pass merges them into the following norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rdnac.compiler.frontend.builder import GraphBuilder
from rdnac.compiler.frontend.spec import AttentionLayer, flag


@dataclass
class Model:
    """What blocks read: the builder, the model's dims and style, per-layer attention, the step inputs."""

    b: GraphBuilder
    config: dict  # config.json with the spec's defaults
    dtype: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    act: str  # gated_act's act
    unit_offset: bool  # every norm scales by 1 + w
    attention: list[AttentionLayer | None]  # per layer (None: the layer has no attention)
    step: dict[str, str]  # step input names: positions, slot_mapping, block_tables, seq_lens, ...

    @property
    def norm_style(self) -> dict:
        """The attributes every (head_)rms_norm of the model takes: Gemma's 1 + w scale, or none."""
        return {"unit_offset": True} if self.unit_offset else {}


class Block(Protocol):
    def emit(self, m: Model, h: str, layer: int) -> str:
        """Emit this block of layer `layer` reading hidden state `h`; returns the new hidden state."""


class Body(Protocol):
    def emit(self, m: Model, x: str, layer: int) -> str:
        """Emit the body reading normalized `x`; returns its output (hidden size)."""


def step_inputs(b: GraphBuilder) -> dict[str, str]:
    """The per-step graph inputs every model reads (a flat ragged batch, see ir/ops.py)."""
    return {"token_ids": b.input("token_ids", "int64", ("T",)),
            "positions": b.input("positions", "int64", ("T",)),
            "slot_mapping": b.input("slot_mapping", "int64", ("T",)),
            "block_tables": b.input("block_tables", "int32", ("B", "MB")),
            "seq_lens": b.input("seq_lens", "int32", ("B",)),
            "cu_seqlens_q": b.input("cu_seqlens_q", "int32", ("B1",)),
            "logits_indices": b.input("logits_indices", "int64", ("R",))}


def norm(m: Model, x: str, module: str, name: str) -> str:
    """rms_norm over the hidden size with checkpoint module `module`'s weight."""
    weight = m.b.weight(f"{module}.weight", (m.hidden,))
    return m.b.node("rms_norm", [x, weight], name, eps=m.eps, **m.norm_style)[0]


def embedding(m: Model, scale: float) -> str:
    weight = m.b.weight("model.embed_tokens.weight", (m.vocab, m.hidden))
    attrs = {"scale": scale} if scale != 1.0 else {}
    return m.b.node("embedding", [m.step["token_ids"], weight], "embed", **attrs)[0]


def head(m: Model, h: str, tied: bool, softcap: float) -> str:
    """Final norm and the logits of the rows `logits_indices` picks (tied: the embedding matrix)."""
    x = norm(m, h, "model.norm", "final_norm")
    weight = "model.embed_tokens.weight" if tied else m.b.weight("lm_head.weight", (m.vocab, m.hidden))
    attrs = {"softcap": softcap} if softcap else {}
    return m.b.node("logits", [x, m.step["logits_indices"], weight], "logits", **attrs)[0]


@dataclass(frozen=True)
class Residual:
    """h + [post_norm](body(norm(h))). Norms are (checkpoint module leaf, node leaf)."""

    body: Body
    norm: tuple[str, str]
    residual: str  # node leaf of the add
    post_norm: tuple[str, str] | None = None  # Gemma's norm of the body's output, before the add

    def emit(self, m: Model, h: str, layer: int) -> str:
        p, n = f"model.layers.{layer}", f"layers.{layer}"
        x = norm(m, h, f"{p}.{self.norm[0]}", f"{n}.{self.norm[1]}")
        y = self.body.emit(m, x, layer)
        if self.post_norm:
            y = norm(m, y, f"{p}.{self.post_norm[0]}", f"{n}.{self.post_norm[1]}")
        return m.b.node("add", [h, y], f"{n}.{self.residual}")[0]


@dataclass(frozen=True)
class Attention:
    """Paged self-attention with RoPE: q/k/v linears -> [q/k norm] -> rope -> K/V cache write -> attention
    -> o linear. Declares its layer's K and V caches (paged_kv state); the layer's variant (window, RoPE
    base and scaling, scale, soft-cap) comes from `Model.attention`. `sinks`: one learned logit per head
    (`self_attn.sinks`, GPT-OSS) joins each softmax's denominator."""

    qkv_bias: bool | str = "attention_bias"
    o_bias: bool | str = "attention_bias"
    qk_norm: bool = False
    output_gate: bool = False  # q_proj also gives a sigmoid gate on the output, per head (Qwen3.5, Qwen3-Next)
    sinks: bool = False

    def emit(self, m: Model, x: str, layer: int) -> str:
        b, c, variant = m.b, m.config, m.attention[layer]
        p, n = f"model.layers.{layer}.self_attn", f"layers.{layer}"
        num_heads, num_kv_heads, head_dim = m.num_heads, m.num_kv_heads, m.head_dim
        qkv_bias = flag(c, self.qkv_bias)
        if self.output_gate:
            q, gate = gated_query(m, x, f"{p}.q_proj", qkv_bias, f"{n}.q_proj")
        else:
            q = b.linear(x, f"{p}.q_proj", num_heads * head_dim, m.hidden, qkv_bias, f"{n}.q_proj")
        k = b.linear(x, f"{p}.k_proj", num_kv_heads * head_dim, m.hidden, qkv_bias, f"{n}.k_proj")
        v = b.linear(x, f"{p}.v_proj", num_kv_heads * head_dim, m.hidden, qkv_bias, f"{n}.v_proj")
        if self.qk_norm:
            style = m.norm_style
            q = b.node("head_rms_norm", [q, b.weight(f"{p}.q_norm.weight", (head_dim,))], f"{n}.q_norm",
                       num_heads=num_heads, head_dim=head_dim, eps=m.eps, **style)[0]
            k = b.node("head_rms_norm", [k, b.weight(f"{p}.k_norm.weight", (head_dim,))], f"{n}.k_norm",
                       num_heads=num_kv_heads, head_dim=head_dim, eps=m.eps, **style)[0]
        rope = variant.rope
        q, k = b.node("rope", [q, k, m.step["positions"]], f"{n}.rope", 2, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, rotary_dim=rope["rotary_dim"],
                      theta=rope["theta"], style="neox", scaling=rope["scaling"])
        k_cache = b.state_input(f"k_cache.{layer}", "paged_kv", layer, m.dtype, (num_kv_heads, head_dim))
        v_cache = b.state_input(f"v_cache.{layer}", "paged_kv", layer, m.dtype, (num_kv_heads, head_dim))
        b.node("kv_cache_write", [k, v, m.step["slot_mapping"], k_cache, v_cache], f"{n}.kv_write", 0,
               num_kv_heads=num_kv_heads, head_dim=head_dim)
        s = m.step
        sinks = [b.weight(f"{p}.sinks", (num_heads,))] if self.sinks else []
        a = b.node("attention", [q, k_cache, v_cache, s["block_tables"], s["seq_lens"], s["cu_seqlens_q"],
                                 s["positions"], *sinks], f"{n}.attn",
                   num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=variant.scale,
                   sliding_window=variant.sliding_window, softcap=variant.softcap)[0]
        if self.output_gate:
            a = b.node("sigmoid_gate", [a, gate], f"{n}.output_gate")[0]
        return b.linear(a, f"{p}.o_proj", m.hidden, num_heads * head_dim, flag(c, self.o_bias), f"{n}.o_proj")


def gated_query(m: Model, x: str, module: str, has_bias: bool, name: str) -> tuple[str, str]:
    """(q, gate) [T, H*D] each, from a q_proj whose rows hold, per head, D query rows then D gate rows:
    its rows are reordered once (all queries, then all gates) so one linear and a column split give both."""
    b, num_heads, head_dim = m.b, m.num_heads, m.head_dim
    rows = 2 * num_heads * head_dim

    def queries_then_gates(t: list):  # [H, 2, D, *] -> [2, H, D, *]
        return t[0].view(num_heads, 2, head_dim, -1).transpose(0, 1).reshape(rows, -1).squeeze(-1)

    b.decide(name, "q_proj rows reordered: all queries, then all gates",
             "its rows hold per head D query rows then D gate rows; one GEMM and a column split give both")
    scheme = b.quantized_scheme(module)
    if scheme is not None and scheme.weight_scheme in ("channel", "tensor"):  # 8-bit rows (and scales) reordered
        y = b.linear(x, module, rows, m.hidden, has_bias, name, reorder_rows=queries_then_gates)
        q, gate = b.node("split", [y], f"{name}.split", 2, sizes=[num_heads * head_dim] * 2)
        return q, gate
    ins = [x, b.derived_weight(f"{module}.weight", [(f"{module}.weight", (rows, m.hidden))], queries_then_gates,
                               (rows, m.hidden), "rows per head [query, gate] as [all queries, all gates]")]
    if has_bias:
        ins.append(b.derived_weight(f"{module}.bias", [(f"{module}.bias", (rows,))],
                                    lambda t: queries_then_gates([t[0][:, None]]), (rows,),
                                    "rows per head [query, gate] as [all queries, all gates]"))
    y = b.node("linear", ins, name)[0]
    q, gate = b.node("split", [y], f"{name}.split", 2, sizes=[num_heads * head_dim] * 2)
    return q, gate


@dataclass(frozen=True)
class GatedMLP:
    """down(act(gate(x)) * up(x)), the dense feed-forward of Llama-like and Gemma models."""

    bias: bool | str = "mlp_bias"

    def emit(self, m: Model, x: str, layer: int) -> str:
        b, bias = m.b, flag(m.config, self.bias)
        p, n = f"model.layers.{layer}.mlp", f"layers.{layer}"
        g = b.linear(x, f"{p}.gate_proj", m.intermediate, m.hidden, bias, f"{n}.gate_proj")
        u = b.linear(x, f"{p}.up_proj", m.intermediate, m.hidden, bias, f"{n}.up_proj")
        a = b.node("gated_act", [g, u], f"{n}.act", act=m.act)[0]
        return b.linear(a, f"{p}.down_proj", m.hidden, m.intermediate, bias, f"{n}.down_proj")
