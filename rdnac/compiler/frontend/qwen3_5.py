"""Qwen3.5 specs: Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM and the text models of their
Qwen3_5(Moe)ForConditionalGeneration wrappers; the hybrid layer Qwen3-Next shares (qwen3_next.py).

Layers are hybrid per `layer_types` (absent: every `full_attention_interval`-th
layer is full attention, the others linear):

- "linear_attention": Residual(GatedDeltaNet) (gated_deltanet.py), with
  per-sequence conv and recurrent state;
- "full_attention": Residual(Attention with q/k norm and an output gate):
  q_proj gives, per head, the query and a gate; the attention output is
  multiplied by sigmoid(gate) before o_proj. RoPE covers the first
  `partial_rotary_factor` of each head (neox style), the rest passes through.

then the feed-forward: Residual(GatedMLP) (dense), or routed experts plus a
gated shared expert (MoE: shared_expert.py, every layer, top-k always
renormalized as transformers' Qwen3_5MoeTopKRouter does). Every RMSNorm but the GDN output's
gated norm scales by 1 + w in float32 (Qwen3_5RMSNorm); the gated norm scales
by w. Text-only positions make transformers' multimodal RoPE sections one
plain RoPE. Multi-token-prediction weights (`mtp.*`) are ignored with a
logged reason; the wrapper's vision tower too.

A layer whose tensors are of the other kind than `layer_types` says is
refused naming the layer, before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rdnac.compiler.frontend.blocks import Attention, GatedMLP, Model, Residual
from rdnac.compiler.frontend.gated_deltanet import GatedDeltaNet, gdn_dims
from rdnac.compiler.frontend.moe import MoE
from rdnac.compiler.frontend.shared_expert import SharedExpertMoE
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


GATED_ATTENTION = Attention(qkv_bias="attention_bias", qk_norm=True, output_gate=True)
DENSE_MLP = Residual(GatedMLP(bias=False), ("post_attention_layernorm", "post_norm"), "mlp_residual")


def hybrid_layer_of(gdn: GatedDeltaNet, feed_forward: Callable[[dict, int], Residual]):
    """`ModelSpec.layer_of` of a hybrid model: the mixer `layer_types` names, then `feed_forward(config, i)`."""
    mixers = {kind: Residual(Mixer(kind, body), ("input_layernorm", "input_norm"), "attn_residual")
              for kind, body in (("linear_attention", gdn), ("full_attention", GATED_ATTENTION))}

    def layer_of(c: dict, index: int) -> tuple:
        return mixers[layer_kinds(c, None)[index]], feed_forward(c, index)

    return layer_of


IGNORE = ((r"mtp\..*", "multi-token-prediction weights: speculative decoding is not supported yet"),
          (r".*rotary_emb\..*inv_freq", "RoPE frequencies are recomputed from config.json"))
MTP = ("mtp_num_hidden_layers", "the multi-token-prediction layers (mtp.*) are ignored: speculative decoding "
       "is not supported yet")
INERT = (MTP, ("output_router_logits", "router logits feed only the training-time auxiliary loss"),
         ("router_aux_loss_coef", "the auxiliary load-balancing loss is training-only"))

QWEN3_5 = ModelSpec("Qwen3_5ForCausalLM", (), attention_layers, defaults=DEFAULTS, unit_offset_norms=True,
                    layer_of=hybrid_layer_of(GatedDeltaNet(), lambda c, i: DENSE_MLP), ignore=IGNORE,
                    inert_config=(MTP,))

# Qwen3.5-MoE: every layer's feed-forward is routed experts (always renormalized) plus a gated shared expert
MOE_DEFAULTS = {**DEFAULTS, "hidden_size": 2048, "num_hidden_layers": 40, "num_key_value_heads": 2,
                "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 8,
                "num_experts": 256}
SHARED_MOE = Residual(SharedExpertMoE(MoE(renormalize=True)), ("post_attention_layernorm", "post_norm"),
                      "moe_residual")
QWEN3_5_MOE = ModelSpec("Qwen3_5MoeForCausalLM", (), attention_layers, defaults=MOE_DEFAULTS,
                        unit_offset_norms=True, layer_of=hybrid_layer_of(GatedDeltaNet(), lambda c, i: SHARED_MOE),
                        ignore=IGNORE, inert_config=INERT)

TOWERS = vision_towers({"visual": "vision tower"})
QWEN3_5_VLM = Wrapper("Qwen3_5ForConditionalGeneration", {"qwen3_5_text": QWEN3_5}, TOWERS)
QWEN3_5_MOE_VLM = Wrapper("Qwen3_5MoeForConditionalGeneration", {"qwen3_5_moe_text": QWEN3_5_MOE}, TOWERS)

ARCHITECTURES = {s.architecture: s for s in (QWEN3_5, QWEN3_5_VLM, QWEN3_5_MOE, QWEN3_5_MOE_VLM)}
