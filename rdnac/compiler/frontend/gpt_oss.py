"""GPT-OSS spec: GptOssForCausalLM, from bf16/fp32 safetensors or the MXFP4 checkpoint layout.

A layer is Residual(Attention) then Residual(GptOssExperts), pre-norm
(`input_layernorm`, `post_attention_layernorm`). Attention has q/k/v/o
biases and one learned sink logit per head (`self_attn.sinks`, in each
softmax's denominator); layers alternate a sliding window
(`sliding_window`, 128) and full attention per `layer_types` (the first
layer slides when the config has none); head_dim comes from config.json
(64); RoPE is YaRN with `truncate` and its attention factor on cos/sin
(rope_math).

The feed-forward is the MoE body (moe.py): the router is a linear with bias
(`mlp.router`), `moe_route` takes the top k logits and softmaxes them, and
`moe_experts` applies the clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`).
transformers keeps the experts as `gate_up_proj [E, H, 2I]` whose COLUMNS
interleave gate (even) and up (odd), `gate_up_proj_bias [E, 2I]`,
`down_proj [E, I, H]`, `down_proj_bias [E, H]` (x @ W); the op takes
[N, K] rows with gate rows then up rows, so they are transposed and
de-interleaved once at compile time. An MXFP4 checkpoint (quant_method mxfp4) stores
`gate_up_proj_blocks [E, 2I, H/32, 16]` (rows already output features,
interleaved) and `down_proj_blocks [E, H, I/32, 16]` with their e8m0
`_scales`: de-interleaving is a row permutation of blocks and scales, so
the plan keeps the checkpoint's bytes and emits `moe_experts_mxfp4`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rdnac.compiler.frontend.blocks import Attention, Model, Residual
from rdnac.compiler.frontend.moe import MoE
from rdnac.compiler.frontend.mxfp4 import read_mxfp4
from rdnac.compiler.frontend.spec import AttentionLayer, ModelSpec, layer_types, rope_config
from rdnac.errors import CheckpointError

LAYER_KINDS = ("sliding_attention", "full_attention")

# GptOssConfig's defaults (transformers writes only the keys that differ from them in some versions)
DEFAULTS = {"num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201_088, "hidden_size": 2880,
            "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
            "sliding_window": 128, "tie_word_embeddings": False, "max_position_embeddings": 131_072,
            "rms_norm_eps": 1e-5, "num_experts_per_tok": 4, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
            "attention_bias": True, "rope_theta": 150_000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 4096}}


def attention_layers(c: dict, head_dim: int, path) -> list[AttentionLayer]:
    num_layers = c["num_hidden_layers"]
    kinds = layer_types(c, num_layers, LAYER_KINDS, path) or \
        ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
    if c.get("rope_parameters"):  # v5 configs: rope_scaling (a default here) is not read beside it
        c = {k: v for k, v in c.items() if k != "rope_scaling"}
    rope = rope_config(c, head_dim, path)
    window = c["sliding_window"] or 0
    return [AttentionLayer(window if kind == "sliding_attention" else 0, rope, head_dim ** -0.5) for kind in kinds]


@dataclass(frozen=True)
class GptOssMoE(MoE):
    """The MoE body as GPT-OSS configures it; MXFP4 experts (quant_method mxfp4) stay 4-bit."""

    def expert_inputs(self, m: Model, layer: int, num_experts: int, inter: int) -> tuple[str, list[str]]:
        b = m.b
        e = f"model.layers.{layer}.{self.module}.experts"
        if b.quant is None or not b.quant.has_mxfp4_experts(e):
            if b.has(f"{e}.gate_up_proj_blocks"):  # never inferred from names: the config decides
                got = f"quant_method {b.quant.method!r}" if b.quant else "no quantization_config"
                raise CheckpointError(f"{b.checkpoint.path}: tensor {b.source(e + '.gate_up_proj_blocks')!r} is "
                                      f"MXFP4 data, which requires quantization_config quant_method mxfp4 covering "
                                      f"{e}; got {got}")
            return super().expert_inputs(m, layer, num_experts, inter)
        w13_blocks, w13_scales = read_mxfp4(b, f"{e}.gate_up_proj", num_experts, 2 * inter, m.hidden)
        w2_blocks, w2_scales = read_mxfp4(b, f"{e}.down_proj", num_experts, m.hidden, inter)
        gate_up, down = b.source(f"{e}.gate_up_proj"), b.source(f"{e}.down_proj")
        ins = [b.add_weight(f"{e}.w13_blocks", self._gate_up(w13_blocks), "mxfp4", f"deinterleave({gate_up}_blocks)"),
               b.add_weight(f"{e}.w13_scales", self._gate_up(w13_scales), "mxfp4-e8m0",
                            f"deinterleave({gate_up}_scales)"),
               b.add_weight(f"{e}.w2_blocks", w2_blocks, "mxfp4", f"{down}_blocks"),
               b.add_weight(f"{e}.w2_scales", w2_scales, "mxfp4-e8m0", f"{down}_scales"),
               b.derived_weight(f"{e}.b13", [(f"{e}.gate_up_proj_bias", (num_experts, 2 * inter))],
                                lambda t: self._gate_up(t[0]), (num_experts, 2 * inter), "deinterleave"),
               b.derived_weight(f"{e}.b2", [(f"{e}.down_proj_bias", (num_experts, m.hidden))], lambda t: t[0],
                                (num_experts, m.hidden), "copy")]
        e2i, h = f"{num_experts}, {2 * inter}", m.hidden
        b.decide(f"layers.{layer}.experts", f"MXFP4 experts kept 4-bit: w13 blocks [{e2i}, {h // 2}] + e8m0 scales "
                 f"[{e2i}, {h // 32}], w2 blocks [{num_experts}, {h}, {inter // 2}] + scales [{num_experts}, {h}, "
                 f"{inter // 32}], biases in {m.dtype}",
                 "gate_up_proj's interleaved rows reordered (gate rows, then up rows) in blocks and scales alike: a "
                 "row permutation of whole e2m1 rows and their e8m0 scales, bit-exact; down_proj as stored")
        return "moe_experts_mxfp4", ins


# transformers' GptOssMLP: router linear with bias, top-k then softmax, experts x @ W with interleaved gate/up
EXPERTS = GptOssMoE(router="router", router_bias=True, scoring="topk_softmax", renormalize=False,
                    num_experts_keys=("num_local_experts",), intermediate_key="intermediate_size", act="swiglu_oai",
                    alpha="swiglu_alpha", limit="swiglu_limit", expert_bias=True, layout="stacked_transposed",
                    interleaved=True)

GPT_OSS = ModelSpec(
    "GptOssForCausalLM",
    (Residual(Attention(sinks=True), ("input_layernorm", "input_norm"), "attn_residual"),
     Residual(EXPERTS, ("post_attention_layernorm", "post_norm"), "mlp_residual")),
    attention_layers, defaults=DEFAULTS,
    ignore=((r".*rotary_emb\..*inv_freq", "RoPE frequencies are recomputed from config.json"),),
    inert_config=(("hidden_act", "GPT-OSS experts apply the clamped SwiGLU (swiglu_alpha, swiglu_limit); "
                   "transformers' GptOssExperts never reads hidden_act"),))

ARCHITECTURES = {GPT_OSS.architecture: GPT_OSS}
