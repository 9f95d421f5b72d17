"""DeepSeek specs: DeepseekV3ForCausalLM (V3, R1 and relatives) and DeepseekV2ForCausalLM (V2, V2-Lite).

A layer is Residual(MLA) (mla.py: multi-head latent attention with a
latent cache) then Residual(feed-forward): a dense GatedMLP of
`intermediate_size` in the first `first_k_dense_replace` layers, else
routed experts plus ungated shared experts (`mlp.shared_experts`,
moe_intermediate_size * n_shared_experts wide), as transformers 5's
DeepseekV3/V2DecoderLayer. DeepSeek's own modeling also skips layers with
i % moe_layer_freq != 0; every released config has 1, and a config with
another value is built by that rule and the decision log says so
(transformers does not read the key).

Routing (rdnac.ir.moe):
- V3: sigmoid scores, `e_score_correction_bias` (float32) for selection
  only, group-limited (`n_group`, `topk_group`), renormalized when
  `norm_topk_prob`, times `routed_scaling_factor` ("sigmoid_group_topk").
  `topk_method` / `scoring_func` are not read, as in transformers.
- V2: softmax, `topk_method` "greedy" (plain top-k) or
  "group_limited_greedy" (best expert per group), times
  `routed_scaling_factor`, never renormalized (transformers' DeepseekV2
  does not read `norm_topk_prob`; logged when set).

RoPE covers `qk_rope_head_dim` in DeepSeek's interleaved pair layout
(style gptj; V3 with `rope_interleave: false` is neox); YaRN with mscale /
mscale_all_dim and the softmax-scale correction (mla.py). Multi-token
prediction layers (`model.layers.{num_hidden_layers}+.*`) are ignored with a
logged reason. FP8 block checkpoints (`weight_block_size` [128, 128],
`weight_scale_inv`) keep their linears in FP8, and their routed experts too
(`moe_experts_fp8_block`: bits and 128x128 scales stacked as stored,
activations quantized per 128 columns at run time); kv_b_proj is dequantized
once at compile time (the MLA ops have no FP8 form yet); the router stays
float.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rdnac.compiler.frontend.blocks import GatedMLP, Model, Residual
from rdnac.compiler.frontend.mla import MLA, mla_attention_layers
from rdnac.compiler.frontend.moe import MoE
from rdnac.compiler.frontend.shared_expert import SharedExpertMoE
from rdnac.compiler.frontend.spec import ModelSpec, config_file
from rdnac.errors import UnsupportedModelError

# DeepseekV3Config's / DeepseekV2Config's defaults: transformers omits keys equal to them from config.json
V3_DEFAULTS = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
               "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
               "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
               "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
               "rope_interleave": True, "attention_bias": False, "moe_layer_freq": 1, "num_nextn_predict_layers": 1}
V2_DEFAULTS = {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "first_k_dense_replace": 0,
               "kv_lora_rank": 512, "q_lora_rank": 1536, "n_group": None, "n_routed_experts": 64,
               "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "routed_scaling_factor": 1.0,
               "topk_group": None, "topk_method": "greedy", "norm_topk_prob": False, "v_head_dim": 128,
               "moe_intermediate_size": 1407, "moe_layer_freq": 1}

@dataclass(frozen=True)
class DeepseekMLA(MLA):
    """MLA that, at layer 0, also logs the config keys whose effect depends on their value and ignores the
    checkpoint's multi-token-prediction layers (their indices follow num_hidden_layers)."""

    version: str = "v3"

    def emit(self, m: Model, x: str, layer: int) -> str:
        if layer == 0:
            _config_notes(m, self.version)
        return super().emit(m, x, layer)


ATTENTION = {v: Residual(DeepseekMLA(version=v), ("input_layernorm", "input_norm"), "attn_residual")
             for v in ("v2", "v3")}
_ROUTED = dict(router="gate", num_experts_keys=("n_routed_experts",), intermediate_key="moe_intermediate_size",
               layout="auto", float_router=True, scaling_key="routed_scaling_factor")
V3_MOE = MoE(scoring="sigmoid_group_topk", renormalize="norm_topk_prob", group_keys=("n_group", "topk_group"),
             correction_bias="gate.e_score_correction_bias", **_ROUTED)
V2_GREEDY = MoE(scoring="softmax_topk", renormalize=False, **_ROUTED)
V2_GROUPED = MoE(scoring="softmax_group_topk", renormalize=False, group_keys=("n_group", "topk_group"), **_ROUTED)
V2_TOPK_METHODS = {"greedy": V2_GREEDY, "group_limited_greedy": V2_GROUPED}


def _feed_forward(routed: MoE) -> Residual:
    return Residual(SharedExpertMoE(routed, intermediate_key="moe_intermediate_size", shared="shared_experts",
                                    gate=None, multiplier_key="n_shared_experts"),
                    ("post_attention_layernorm", "post_norm"), "moe_residual")


DENSE = Residual(GatedMLP(bias="mlp_bias"), ("post_attention_layernorm", "post_norm"), "mlp_residual")
FEED_FORWARD = {"v3": _feed_forward(V3_MOE), **{k: _feed_forward(v) for k, v in V2_TOPK_METHODS.items()}}


def is_sparse(c: dict, index: int) -> bool:
    """DeepSeek's rule: experts from layer first_k_dense_replace on, every moe_layer_freq-th layer."""
    return bool(c.get("n_routed_experts")) and index >= c["first_k_dense_replace"] \
        and index % c["moe_layer_freq"] == 0


def _v3_layer_of(c: dict, index: int) -> tuple:
    return ATTENTION["v3"], FEED_FORWARD["v3"] if is_sparse(c, index) else DENSE


def _v2_layer_of(c: dict, index: int) -> tuple:
    return ATTENTION["v2"], FEED_FORWARD[c["topk_method"]] if is_sparse(c, index) else DENSE


def _checked(style_of, has_topk_method: bool):
    """attention_layers for a DeepSeek spec: the config checks that need the path, then MLA's RoPE per layer
    (`style_of(config)`: the RoPE layout)."""
    def attention_layers(c: dict, head_dim: int, path) -> list:
        where = config_file(path)
        for key in ("first_k_dense_replace", "moe_layer_freq"):
            value = c.get(key)
            least = 1 if key == "moe_layer_freq" else 0
            if not isinstance(value, int) or value < least:
                raise UnsupportedModelError(f"{where}: {key} requires an integer >= {least}; got {value!r}")
        method = c.get("topk_method")
        if has_topk_method and method not in V2_TOPK_METHODS:
            raise UnsupportedModelError(f"{where}: topk_method {method!r} is not supported by DeepseekV2; "
                                        f"supported: {', '.join(V2_TOPK_METHODS)}")
        if c.get("mlp_bias") and c.get("n_routed_experts"):
            raise UnsupportedModelError(f"{where}: mlp_bias true requires biased shared experts, which rdnac does "
                                        "not build; got mlp_bias true")
        _check_block_size(c, where)
        return mla_attention_layers(c, path, style_of(c))
    return attention_layers


def _check_block_size(c: dict, where) -> None:
    """DeepSeek's native FP8 layout is 128x128 weight blocks; another block size is refused, naming it."""
    qc = c.get("quantization_config") or {}
    block = qc.get("weight_block_size")
    if qc.get("quant_method") == "fp8" and block is not None and list(block) != [128, 128]:
        raise UnsupportedModelError(f"{where}: quantization_config.weight_block_size requires [128, 128] (DeepSeek's "
                                    f"FP8 block layout, weight_scale_inv per 128x128 block); got {block!r}")


def _mtp_ignores(config: dict, names: list[str]) -> tuple[tuple[str, str], ...]:
    """Ignore rules for the layers after the last decoder layer that num_nextn_predict_layers declares
    (V3/R1 ship one, model.layers.61); any other extra layer stays unused and fails the compile."""
    first = config["num_hidden_layers"]
    mtp = range(first, first + (config.get("num_nextn_predict_layers") or 0))
    layers = sorted({int(m.group(1)) for name in names if (m := re.match(r"model\.layers\.(\d+)\.", name))
                     and int(m.group(1)) in mtp})
    return tuple((rf"model\.layers\.{i}\..*", "a multi-token-prediction layer (num_nextn_predict_layers): "
                  "speculative decoding is not supported yet") for i in layers)


def _spec(architecture: str, defaults: dict, layer_of, style_of, inert, has_topk_method: bool = False) -> ModelSpec:
    return ModelSpec(architecture, (), _checked(style_of, has_topk_method), defaults=defaults, layer_of=layer_of,
                     ignore=((r".*rotary_emb\.inv_freq", "RoPE frequencies are recomputed from config.json"),),
                     inert_config=inert)


_TRAINING = (("output_router_logits", "router logits feed only the training-time auxiliary loss"),
             ("aux_loss_alpha", "the auxiliary load-balancing loss is training-only"),
             ("seq_aux", "the auxiliary load-balancing loss is training-only"))
DEEPSEEK_V3 = _spec("DeepseekV3ForCausalLM", V3_DEFAULTS, _v3_layer_of,
                    lambda c: "gptj" if c.get("rope_interleave", True) else "neox",
                    _TRAINING + (("topk_method", "transformers' DeepseekV3 routes noaux_tc (sigmoid, correction "
                                                 "bias, groups) whatever topk_method says"),
                                 ("scoring_func", "transformers' DeepseekV3 scores experts with a sigmoid"),
                                 ("num_nextn_predict_layers", "multi-token-prediction layers are ignored")))
DEEPSEEK_V2 = _spec("DeepseekV2ForCausalLM", V2_DEFAULTS, _v2_layer_of,
                    lambda c: "gptj",
                    _TRAINING + (("scoring_func", "transformers' DeepseekV2 scores experts with a softmax"),),
                    has_topk_method=True)

ARCHITECTURES = {s.architecture: s for s in (DEEPSEEK_V3, DEEPSEEK_V2)}


def _config_notes(m: Model, version: str) -> None:
    c, b = m.config, m.b
    if c.get("moe_layer_freq", 1) != 1:
        b.decide("model", f"moe_layer_freq {c['moe_layer_freq']}: experts every {c['moe_layer_freq']}-th layer",
                 "DeepSeek's modeling rule; transformers does not read moe_layer_freq")
    if version == "v2" and c.get("norm_topk_prob"):
        b.decide("model", "norm_topk_prob not applied", "transformers' DeepseekV2 router never renormalizes")
    for pattern, reason in _mtp_ignores(c, list(b.checkpoint.tensors.names())):
        b.ignore(pattern, reason)
