"""Qwen3.5 (dense) spec: Qwen3_5ForCausalLM and the text model of Qwen3_5ForConditionalGeneration.

Layers are hybrid per `layer_types` (absent: every `full_attention_interval`-th
layer is full attention, the others linear):

- "linear_attention": Residual(GatedDeltaNet) (gated_deltanet.py), with
  per-sequence conv and recurrent state;
- "full_attention": Residual(Attention with q/k norm and an output gate):
  q_proj gives, per head, the query and a gate; the attention output is
  multiplied by sigmoid(gate) before o_proj. RoPE covers the first
  `partial_rotary_factor` of each head (neox style), the rest passes through.

then Residual(GatedMLP) in every layer. Every RMSNorm but the GDN output's
gated norm scales by 1 + w in float32 (Qwen3_5RMSNorm); the gated norm scales
by w. Text-only positions make transformers' multimodal RoPE sections one
plain RoPE. Multi-token-prediction weights (`mtp.*`) are ignored with a
logged reason; the wrapper's vision tower too.

A layer whose tensors are of the other kind than `layer_types` says is
refused naming the layer, before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from rdnac.compiler.frontend.blocks import Attention, GatedMLP, Model, Residual
from rdnac.compiler.frontend.gated_deltanet import GatedDeltaNet, gdn_dims
from rdnac.compiler.frontend.spec import AttentionLayer, ModelSpec, Wrapper, config_file, layer_types, rope_config, \
    vision_towers
from rdnac.errors import CheckpointError

LAYER_KINDS = ("linear_attention", "full_attention")
MODULES = {"linear_attention": "linear_attn", "full_attention": "self_attn"}

# Qwen3_5TextConfig's defaults (transformers omits keys equal to them in some configs)
DEFAULTS = {"vocab_size": 248_320, "hidden_size": 4096, "intermediate_size": 12_288, "num_hidden_layers": 32,
            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256, "hidden_act": "silu",
            "max_position_embeddings": 32_768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
            "attention_bias": False, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
            "partial_rotary_factor": 0.25, "full_attention_interval": 4}


def layer_kinds(c: dict, path) -> list[str]:
    num_layers = c["num_hidden_layers"]
    kinds = layer_types(c, num_layers, LAYER_KINDS, path)
    if kinds is None:
        interval = c["full_attention_interval"]
        kinds = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]
    return kinds


def attention_layers(c: dict, head_dim: int, path) -> list[AttentionLayer | None]:
    gdn_dims(c, path)  # refuses a conv kernel the plan cannot hold before any weight is read
    rope = rope_config(c, head_dim, path)
    return [AttentionLayer(0, rope, head_dim ** -0.5) if kind == "full_attention" else None
            for kind in layer_kinds(c, path)]


@dataclass(frozen=True)
class Mixer:
    """A layer's token mixer of the kind `layer_types` names, after checking the tensors are of that kind."""

    kind: str
    body: object

    def emit(self, m: Model, x: str, layer: int) -> str:
        b, prefix = m.b, f"model.layers.{layer}."
        other = next(k for k in LAYER_KINDS if k != self.kind)
        if not b.has_module(prefix + MODULES[self.kind]) and b.has_module(prefix + MODULES[other]):
            raise CheckpointError(f"{config_file(b.checkpoint.path)}: layer_types[{layer}] is {self.kind!r}, which "
                                  f"requires {prefix}{MODULES[self.kind]}.* tensors; got {prefix}{MODULES[other]}.* "
                                  f"(a {other} layer); fix layer_types to match the checkpoint")
        return self.body.emit(m, x, layer)


_MLP = Residual(GatedMLP(bias=False), ("post_attention_layernorm", "post_norm"), "mlp_residual")
_LAYERS = {
    "linear_attention": (Residual(Mixer("linear_attention", GatedDeltaNet()), ("input_layernorm", "input_norm"),
                                  "attn_residual"), _MLP),
    "full_attention": (Residual(Mixer("full_attention", Attention(qkv_bias="attention_bias", qk_norm=True,
                                                                  output_gate=True)),
                                ("input_layernorm", "input_norm"), "attn_residual"), _MLP),
}


def layer_of(c: dict, index: int) -> tuple:
    return _LAYERS[layer_kinds(c, None)[index]]


QWEN3_5 = ModelSpec(
    "Qwen3_5ForCausalLM", _LAYERS["full_attention"], attention_layers, defaults=DEFAULTS, unit_offset_norms=True,
    layer_of=layer_of,
    ignore=((r"mtp\..*", "multi-token-prediction weights: speculative decoding is not supported yet"),
            (r".*rotary_emb\..*inv_freq", "RoPE frequencies are recomputed from config.json")))

QWEN3_5_VLM = Wrapper("Qwen3_5ForConditionalGeneration", {"qwen3_5_text": QWEN3_5},
                      vision_towers({"visual": "vision tower"}))

ARCHITECTURES = {s.architecture: s for s in (QWEN3_5, QWEN3_5_VLM)}
