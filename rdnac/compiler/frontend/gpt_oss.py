"""GPT-OSS spec: GptOssForCausalLM, from bf16/fp32 safetensors or the MXFP4 checkpoint layout.

A layer is Residual(Attention) then Residual(GptOssExperts), pre-norm
(`input_layernorm`, `post_attention_layernorm`). Attention has q/k/v/o
biases and one learned sink logit per head (`self_attn.sinks`, in each
softmax's denominator); layers alternate a sliding window
(`sliding_window`, 128) and full attention per `layer_types` (the first
layer slides when the config has none); head_dim comes from config.json
(64); RoPE is YaRN with `truncate` and its attention factor on cos/sin
(rope_math).

The feed-forward is a mixture of experts: the router is a linear with bias
(`mlp.router`), `moe_route` takes the top k logits and softmaxes them, and
`moe_experts` applies the clamped SwiGLU (`swiglu_alpha`, `swiglu_limit`).
transformers keeps the experts as `gate_up_proj [E, H, 2I]` whose COLUMNS
interleave gate (even) and up (odd), `gate_up_proj_bias [E, 2I]`,
`down_proj [E, I, H]`, `down_proj_bias [E, H]` (x @ W); the op takes
[N, K] rows with gate rows then up rows, so they are transposed and
de-interleaved once here. An MXFP4 checkpoint (quant_method mxfp4) stores
`gate_up_proj_blocks [E, 2I, H/32, 16]` (rows already output features,
interleaved) and `down_proj_blocks [E, H, I/32, 16]` with their e8m0
`_scales`: de-interleaving is a row permutation of blocks and scales, so
the plan keeps the checkpoint's bytes and emits `moe_experts_mxfp4`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rdnac.compiler.frontend.blocks import Attention, Model, Residual
from rdnac.compiler.frontend.mxfp4 import read_mxfp4
from rdnac.compiler.frontend.spec import AttentionLayer, ModelSpec, config_file, layer_types, rope_config
from rdnac.errors import CheckpointError, UnsupportedModelError

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


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Gate (even) and up (odd) entries along `dim` -> all gates, then all ups (a permutation: exact)."""
    size = t.shape[dim]
    return t.index_select(dim, torch.cat([torch.arange(0, size, 2), torch.arange(1, size, 2)]))


@dataclass(frozen=True)
class GptOssExperts:
    """Router linear (with bias) -> top-k then softmax -> the experts' clamped SwiGLU, float or MXFP4."""

    def emit(self, m: Model, x: str, layer: int) -> str:
        b, c = m.b, m.config
        p, n = f"model.layers.{layer}.mlp", f"layers.{layer}"
        num_experts, top_k, inter = c["num_local_experts"], c["num_experts_per_tok"], m.intermediate
        if not 1 <= top_k <= num_experts:
            raise UnsupportedModelError(f"{config_file(b.checkpoint.path)}: num_experts_per_tok requires 1 to "
                                        f"num_local_experts ({num_experts}); got {top_k}")
        router = b.linear(x, f"{p}.router", num_experts, m.hidden, True, f"{n}.router")
        weights, ids = b.node("moe_route", [router], f"{n}.route", 2, top_k=top_k, scoring="topk_softmax")
        e = f"{p}.experts"
        biases = self._biases(m, e, num_experts, inter)
        attrs = {"act": "swiglu_oai", "alpha": float(c["swiglu_alpha"]), "limit": float(c["swiglu_limit"])}
        if b.quant is not None and b.quant.has_mxfp4_experts(e):
            w13_blocks, w13_scales = read_mxfp4(b, f"{e}.gate_up_proj", num_experts, 2 * inter, m.hidden)
            w2_blocks, w2_scales = read_mxfp4(b, f"{e}.down_proj", num_experts, m.hidden, inter)
            src = b.source(f"{e}.gate_up_proj_blocks").removesuffix("_blocks")
            ins = [b.add_weight(f"{e}.w13_blocks", deinterleave(w13_blocks, 1), "mxfp4", f"deinterleave({src}_blocks)"),
                   b.add_weight(f"{e}.w13_scales", deinterleave(w13_scales, 1), "mxfp4-e8m0",
                                f"deinterleave({src}_scales)"),
                   b.add_weight(f"{e}.w2_blocks", w2_blocks, "mxfp4", b.source(f"{e}.down_proj_blocks")),
                   b.add_weight(f"{e}.w2_scales", w2_scales, "mxfp4-e8m0", b.source(f"{e}.down_proj_scales"))]
            if layer == 0:
                b.decide(f"{n}.experts", "MXFP4 experts kept 4-bit: gate_up_proj rows de-interleaved (gate rows, then "
                         "up rows) in blocks and scales alike; down_proj as stored",
                         "a row permutation moves whole rows of e2m1 bytes and their e8m0 scales: bit-exact")
            return b.node("moe_experts_mxfp4", [x, weights, ids, *ins, *biases], f"{n}.experts", **attrs)[0]
        dtype = getattr(torch, m.dtype)
        gate_up = self._float(b, f"{e}.gate_up_proj", (num_experts, m.hidden, 2 * inter))  # [E, H, 2I], x @ W
        down = self._float(b, f"{e}.down_proj", (num_experts, inter, m.hidden))  # [E, I, H]
        w13 = deinterleave(gate_up.transpose(1, 2), 1).to(dtype)  # [E, 2I, H]: gate rows, then up rows
        w2 = down.transpose(1, 2).to(dtype)  # [E, H, I]
        ins = [b.add_weight(f"{e}.w13", w13, "none", f"deinterleave(transpose({b.source(e + '.gate_up_proj')}))"),
               b.add_weight(f"{e}.w2", w2, "none", f"transpose({b.source(e + '.down_proj')})")]
        if layer == 0:
            b.decide(f"{n}.experts", "gate_up_proj [E, H, 2I] -> w13 [E, 2I, H] (transposed, gate/up columns "
                     "de-interleaved into gate rows then up rows); down_proj [E, I, H] -> w2 [E, H, I]",
                     "moe_experts takes [N, K] weights like linear, gate and up contiguous: one layout for every "
                     "kernel, made once at compile time")
        return b.node("moe_experts", [x, weights, ids, *ins, *biases], f"{n}.experts", **attrs)[0]

    @staticmethod
    def _float(b, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        w = b.read(name, shape)
        if not w.is_floating_point():
            hint = "; it looks like MXFP4 data without quantization_config quant_method mxfp4" \
                if w.dtype == torch.uint8 else ""
            raise CheckpointError(f"{b.checkpoint.path}: tensor {b.source(name)!r} requires a float dtype; "
                                  f"got {str(w.dtype).removeprefix('torch.')}{hint}")
        return w

    def _biases(self, m: Model, e: str, num_experts: int, inter: int) -> list[str]:
        b, dtype = m.b, getattr(torch, m.dtype)
        b13 = deinterleave(self._float(b, f"{e}.gate_up_proj_bias", (num_experts, 2 * inter)), 1).to(dtype)
        b2 = self._float(b, f"{e}.down_proj_bias", (num_experts, m.hidden)).to(dtype)
        return [b.add_weight(f"{e}.b13", b13, "none", f"deinterleave({b.source(e + '.gate_up_proj_bias')})"),
                b.add_weight(f"{e}.b2", b2, "none", b.source(f"{e}.down_proj_bias"))]


GPT_OSS = ModelSpec(
    "GptOssForCausalLM",
    (Residual(Attention(sinks=True), ("input_layernorm", "input_norm"), "attn_residual"),
     Residual(GptOssExperts(), ("post_attention_layernorm", "post_norm"), "mlp_residual")),
    attention_layers, defaults=DEFAULTS,
    ignore=((r".*rotary_emb\..*inv_freq", "RoPE frequencies are recomputed from config.json"),),
    inert_config=(("hidden_act", "GPT-OSS experts apply the clamped SwiGLU (swiglu_alpha, swiglu_limit); "
                   "transformers' GptOssExperts never reads hidden_act"),))

ARCHITECTURES = {GPT_OSS.architecture: GPT_OSS}
