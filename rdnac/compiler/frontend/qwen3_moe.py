"""Qwen3-MoE spec: Qwen3MoeForCausalLM (Qwen3-30B-A3B, Qwen3-235B-A22B).

A layer is Residual(Attention with q/k norm) then Residual(feed-forward),
as Qwen3's; the feed-forward is the routed `MoE` body (moe.py: softmax over
all experts, the top `num_experts_per_tok`, renormalized when
`norm_topk_prob`) in layer i when i is not in `mlp_only_layers` and
(i + 1) % `decoder_sparse_step` == 0, else a dense `GatedMLP` of
`intermediate_size` (the experts' size is `moe_intermediate_size`).

Sliding window, as transformers 5's Qwen3MoeConfig/Qwen3MoeAttention
compute it: `sliding_window` on every layer when `use_sliding_window`,
none otherwise; `max_window_layers` is not read (logged when set).
`output_router_logits` and `router_aux_loss_coef` are training-only (the
auxiliary load-balancing loss) and change no logits.
"""

from __future__ import annotations

from rdnac.compiler.frontend import llama
from rdnac.compiler.frontend.blocks import Attention, GatedMLP, Residual
from rdnac.compiler.frontend.moe import MoE
from rdnac.compiler.frontend.spec import AttentionLayer, ModelSpec, config_file, rope_config
from rdnac.errors import UnsupportedModelError

# Qwen3MoeConfig's defaults for keys a config.json may leave out (the expert count is read from
# num_experts or num_local_experts, which transformers 5 writes, by MoE itself)
DEFAULTS = {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False, "num_experts_per_tok": 8,
            "moe_intermediate_size": 768, "use_sliding_window": False, "sliding_window": 4096,
            "attention_bias": False}

ATTENTION = Residual(Attention(qk_norm=True), ("input_layernorm", "input_norm"), "attn_residual")
SPARSE = (ATTENTION, Residual(MoE(), ("post_attention_layernorm", "post_norm"), "moe_residual"))
DENSE = (ATTENTION, Residual(GatedMLP(bias=False), ("post_attention_layernorm", "post_norm"), "mlp_residual"))


def is_sparse(c: dict, index: int) -> bool:
    """transformers' Qwen3MoeDecoderLayer rule: experts unless listed dense or off the sparse step."""
    step = c["decoder_sparse_step"]  # checked by attention_layers, which runs first
    num_experts = c.get("num_experts", c.get("num_local_experts", 128))
    return index not in (c["mlp_only_layers"] or []) and num_experts > 0 and (index + 1) % step == 0


def layer_of(c: dict, index: int) -> tuple:
    return SPARSE if is_sparse(c, index) else DENSE


def attention_layers(c: dict, head_dim: int, path) -> list[AttentionLayer]:
    step = c["decoder_sparse_step"]
    if not isinstance(step, int) or step < 1:  # checked here, where the path is known, for layer_of
        raise UnsupportedModelError(f"{config_file(path)}: decoder_sparse_step requires a positive integer; "
                                    f"got {step!r}")
    if c.get("layer_types"):
        return llama.attention_layers(c, head_dim, path)
    rope = rope_config(c, head_dim, path)
    window = (c.get("sliding_window") or 0) if c.get("use_sliding_window") else 0
    return [AttentionLayer(window, rope, head_dim ** -0.5) for _ in range(c["num_hidden_layers"])]


QWEN3_MOE = ModelSpec(
    "Qwen3MoeForCausalLM", SPARSE, attention_layers, defaults=DEFAULTS, layer_of=layer_of,
    ignore=((r".*rotary_emb\.inv_freq", "RoPE frequencies are recomputed from config.json"),),
    inert_config=(("output_router_logits", "router logits feed only the training-time auxiliary loss"),
                  ("router_aux_loss_coef", "the auxiliary load-balancing loss is training-only"),
                  ("max_window_layers", "transformers' Qwen3-MoE windows every layer when use_sliding_window "
                                        "is set and never reads max_window_layers")))

ARCHITECTURES = {QWEN3_MOE.architecture: QWEN3_MOE}
