"""Gemma 2 spec: Gemma 3's layer without q/k norm, one RoPE, attention soft-capped.

Every other layer (the first included) has a sliding window, unless
`layer_types` says otherwise; attention scores are scaled by
query_pre_attn_scalar**-0.5 and soft-capped by `attn_logit_softcapping`
(transformers' Gemma2Attention applies it), the logits by
`final_logit_softcapping`. Norms, embedding scale and the GELU-tanh MLP are
Gemma 3's (gemma3.py).
"""

from __future__ import annotations

from dataclasses import replace

from rdnac.compiler.frontend.blocks import Attention
from rdnac.compiler.frontend.gemma3 import GEMMA3, LAYER_KINDS, check_causal, layer
from rdnac.compiler.frontend.spec import AttentionLayer, layer_types, rope_config

# Gemma2Config's defaults (transformers writes only the keys that differ)
DEFAULTS = {"vocab_size": 256_000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True, "attention_bias": False, "query_pre_attn_scalar": 256,
            "sliding_window": 4096, "rope_theta": 10_000.0, "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0}


def attention_layers(c: dict, head_dim: int, path) -> list[AttentionLayer]:
    check_causal(c, path)
    num_layers = c["num_hidden_layers"]
    kinds = layer_types(c, num_layers, LAYER_KINDS, path) or \
        ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    rope = rope_config(c, head_dim, path)
    scale = float(c["query_pre_attn_scalar"]) ** -0.5
    softcap = float(c.get("attn_logit_softcapping") or 0.0)
    window = c["sliding_window"] or 0
    return [AttentionLayer(window if kind == "sliding_attention" else 0, rope, scale, softcap) for kind in kinds]


GEMMA2 = replace(GEMMA3, architecture="Gemma2ForCausalLM", layer=layer(Attention()), defaults=DEFAULTS,
                 attention_layers=attention_layers, inert_config=())

ARCHITECTURES = {GEMMA2.architecture: GEMMA2}
