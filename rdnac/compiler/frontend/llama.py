"""Llama-family specs: Llama, Mistral, Ministral3, Qwen2 (q/k/v bias), Qwen3 (q/k norm), Mistral3 (text).

One layer: Residual(Attention) then Residual(GatedMLP), pre-norm, weights
read as `input_layernorm` and `post_attention_layernorm` (the pre-MLP norm in
this family). Every layer has the same RoPE; sliding windows per layer come
from `layer_types`, Qwen's `use_sliding_window`/`max_window_layers`, or
Mistral's one `sliding_window`.

Mistral3ForConditionalGeneration (a vision-language wrapper around a
Mistral/Ministral3 text model) is compiled text-only: its text tensors are
read under canonical names and the vision tower and projector are ignored
with that reason in the decision log.
"""

from __future__ import annotations

from dataclasses import replace

from rdnac.compiler.frontend.blocks import Attention, GatedMLP, Residual
from rdnac.compiler.frontend.builder import GraphBuilder
from rdnac.compiler.frontend.spec import AttentionLayer, ModelSpec, Wrapper, layer_types, rope_config, vision_towers


def attention_layers(c: dict, head_dim: int, path) -> list[AttentionLayer]:
    """One RoPE for every layer; a window per layer (0: global)."""
    num_layers = c["num_hidden_layers"]
    rope = rope_config(c, head_dim, path)
    window = c.get("sliding_window") or 0
    types = layer_types(c, num_layers, ("sliding_attention", "full_attention"), path)
    if types:
        windows = [window if t == "sliding_attention" else 0 for t in types]
    elif "use_sliding_window" in c:  # Qwen2/Qwen3 v4 configs
        start = c.get("max_window_layers", num_layers)
        windows = [window if c["use_sliding_window"] and i >= start else 0 for i in range(num_layers)]
    else:
        windows = [window] * num_layers  # Mistral: one window for all layers, or none
    return [AttentionLayer(w, rope, head_dim ** -0.5) for w in windows]


def ministral3_max_positions(b: GraphBuilder, c: dict) -> int:
    """Ministral3 multiplies queries by 1 + beta*log(1 + floor(pos / original_max_position_embeddings)); that is
    exactly 1 below original_max_position_embeddings, so the plan is limited to those positions until the IR
    carries position-dependent query scaling."""
    limit = c.get("max_position_embeddings", 4096)
    rope_params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    beta = rope_params.get("llama_4_scaling_beta")
    if beta:
        original = rope_params.get("original_max_position_embeddings") or limit
        if original < limit:
            b.decide("attention", f"max_position_embeddings {limit} -> {original}",
                     f"llama_4_scaling_beta={beta} scales queries by 1+beta*log(1+floor(pos/{original})), exactly 1 "
                     f"below position {original}; longer contexts need a query-scaling op rdnac does not have yet")
            limit = original
        else:
            b.decide("attention", "llama_4_scaling_beta: no query scaling", f"1+beta*log(1+floor(pos/{original})) "
                     f"is exactly 1 for every position below max_position_embeddings {limit}")
    return limit


def _layer(attention: Attention) -> tuple:
    return (Residual(attention, ("input_layernorm", "input_norm"), "attn_residual"),
            Residual(GatedMLP(), ("post_attention_layernorm", "post_norm"), "mlp_residual"))


LLAMA = ModelSpec("LlamaForCausalLM", _layer(Attention()), attention_layers,
                  ignore=((r".*rotary_emb\.inv_freq", "RoPE frequencies are recomputed from config.json"),),
                  max_positions=ministral3_max_positions)
MISTRAL = replace(LLAMA, architecture="MistralForCausalLM")
MINISTRAL3 = replace(LLAMA, architecture="Ministral3ForCausalLM")
QWEN2 = replace(LLAMA, architecture="Qwen2ForCausalLM", layer=_layer(Attention(qkv_bias=True, o_bias=False)))
QWEN3 = replace(LLAMA, architecture="Qwen3ForCausalLM", layer=_layer(Attention(qk_norm=True)))

MISTRAL3 = Wrapper("Mistral3ForConditionalGeneration", {"mistral": MISTRAL, "ministral3": MINISTRAL3},
                   vision_towers({"vision_tower": "vision tower", "multi_modal_projector": "multimodal projector"}))

ARCHITECTURES = {s.architecture: s for s in (LLAMA, MISTRAL, MINISTRAL3, QWEN2, QWEN3, MISTRAL3)}
