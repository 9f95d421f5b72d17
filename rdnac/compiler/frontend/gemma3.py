"""Gemma 3 spec: Gemma3ForCausalLM and the text model of Gemma3ForConditionalGeneration.

A layer is Residual(Attention with q/k norm) then Residual(GatedMLP), each
with a norm before and after its body (four norms per layer); every RMSNorm
scales by 1 + w, in float32 and cast once (transformers' Gemma3RMSNorm).
Layers alternate local (sliding window, RoPE base `rope_local_base_freq`)
and global (no window, `rope_theta` and the RoPE scaling) per `layer_types`,
or older configs' `sliding_window_pattern` (every n-th layer global).
Attention scores are scaled by query_pre_attn_scalar**-0.5 and not
soft-capped: `attn_logit_softcapping` is read by transformers' config but
never applied by its Gemma3Attention (the decision log says so when set); embeddings are multiplied by
sqrt(hidden) cast to the weights' dtype; the logits are optionally
soft-capped (`final_logit_softcapping`). The MLP is GELU-tanh gated.

Gemma3ForConditionalGeneration is compiled text-only: the SigLIP vision
tower and the multimodal projector are ignored with that reason (rdnac
takes no images yet); like transformers' wrapper, it does not soft-cap the
logits. GGUF Gemma 3 files arrive here with HF names.
"""

from __future__ import annotations

from dataclasses import replace

from rdnac.compiler.frontend.blocks import Attention, GatedMLP, Residual
from rdnac.compiler.frontend.spec import (AttentionLayer, ModelSpec, Wrapper, config_file, layer_types, rope_config,
                                          vision_towers)
from rdnac.errors import UnsupportedModelError

LAYER_KINDS = ("sliding_attention", "full_attention")

# Gemma3TextConfig's defaults: transformers writes only the keys that differ, and the Hub's
# Gemma3ForConditionalGeneration configs give a sparse text_config that relies on them.
DEFAULTS = {"vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0, "final_logit_softcapping": None, "attn_logit_softcapping": None}


def _layer_kinds(c: dict, path) -> list[str]:
    num_layers = c["num_hidden_layers"]
    kinds = layer_types(c, num_layers, LAYER_KINDS, path)
    if kinds is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = c["sliding_window_pattern"]
        kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    return kinds


def _rope(c: dict, kind: str, head_dim: int, path) -> dict:
    """RoPE of one layer kind: v5 `rope_parameters` per kind, or v4 `rope_theta` + `rope_scaling` (global)
    and `rope_local_base_freq` (local, never scaled)."""
    params = c.get("rope_parameters") or {}
    if any(k in params for k in LAYER_KINDS):
        return rope_config({"rope_parameters": params.get(kind) or {},
                            "max_position_embeddings": c["max_position_embeddings"]}, head_dim, path)
    if kind == "sliding_attention":
        return rope_config({"rope_theta": c["rope_local_base_freq"]}, head_dim, path)
    return rope_config({"rope_theta": c["rope_theta"], "rope_scaling": c.get("rope_scaling") or params,
                        "max_position_embeddings": c["max_position_embeddings"]}, head_dim, path)


def check_causal(c: dict, path) -> None:
    if c.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{config_file(path)}: use_bidirectional_attention requires causal attention "
                                    "(an embedding model); got true; rdnac compiles causal language models only")


def attention_layers(c: dict, head_dim: int, path) -> list[AttentionLayer]:
    check_causal(c, path)
    ropes = {kind: _rope(c, kind, head_dim, path) for kind in LAYER_KINDS}
    scale = float(c["query_pre_attn_scalar"]) ** -0.5
    window = c["sliding_window"] or 0
    return [AttentionLayer(window if kind == "sliding_attention" else 0, ropes[kind], scale)
            for kind in _layer_kinds(c, path)]


def layer(attention: Attention) -> tuple:
    """Gemma's layer (2 and 3): a norm before and after each body, then the residual add."""
    return (Residual(attention, ("input_layernorm", "input_norm"), "attn_residual",
                     post_norm=("post_attention_layernorm", "post_attn_norm")),
            Residual(GatedMLP(bias=False), ("pre_feedforward_layernorm", "pre_ffn_norm"), "mlp_residual",
                     post_norm=("post_feedforward_layernorm", "post_ffn_norm")))


GEMMA3 = ModelSpec(
    "Gemma3ForCausalLM", layer(Attention(qk_norm=True)), attention_layers, defaults=DEFAULTS,
    activation_key="hidden_activation", unit_offset_norms=True, embedding_scale="sqrt_hidden",
    final_softcap_key="final_logit_softcapping",
    ignore=((r".*rotary_emb\..*inv_freq", "RoPE frequencies are recomputed from config.json"),),
    inert_config=(("attn_logit_softcapping", "Gemma 3 attention has no soft-cap (q/k norm replaced Gemma 2's); "
                   "transformers' Gemma3Attention keeps the key but never applies it"),))

# transformers' Gemma3ForConditionalGeneration returns lm_head's logits as they are (Gemma3ForCausalLM caps them)
_VLM_TEXT = replace(GEMMA3, final_softcap_key=None, inert_config=GEMMA3.inert_config + (
    ("final_logit_softcapping", "transformers' Gemma3ForConditionalGeneration does not soft-cap its logits "
     "(its Gemma3ForCausalLM does); the text model of the wrapper is compiled as the wrapper computes it"),))
GEMMA3_VLM = Wrapper("Gemma3ForConditionalGeneration", {"gemma3_text": _VLM_TEXT},
                     vision_towers({"vision_tower": "vision tower (SigLIP)",
                                    "multi_modal_projector": "multimodal projector"}))

ARCHITECTURES = {s.architecture: s for s in (GEMMA3, GEMMA3_VLM)}
