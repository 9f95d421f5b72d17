"""Llama-family graph builder: Llama, Mistral, Ministral3, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

One decoder layer: rms_norm -> q/k/v linears -> [q/k norm] -> rope ->
kv_cache_write -> attention -> o linear -> add -> rms_norm -> gate/up
linears -> gated_act -> down linear -> add. The residual adds are emitted
unfused; the fuse_add_rms_norm pass merges them into the following norm.
Linears covered by an FP8 `quantization_config` become `linear_fp8`.

Mistral3ForConditionalGeneration (a vision-language wrapper around a
Mistral/Ministral3 text model) is compiled text-only: its text tensors are
read under canonical names and the vision tower and projector are ignored
with that reason in the decision log.
"""

from __future__ import annotations

from rdnac.compiler.frontend.builder import GraphBuilder
from rdnac.compiler.frontend.checkpoint import Checkpoint
from rdnac.errors import UnsupportedModelError

_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def rope_config(config: dict, head_dim: int, path) -> dict:
    """Normalize the HF v4 (`rope_theta`, `rope_scaling`) and v5 (`rope_parameters`) forms."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    prf = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * prf)
    if kind == "default":
        return {"theta": float(theta), "rotary_dim": rotary_dim, "scaling": None}
    if kind not in ("linear", "llama3", "yarn"):
        raise UnsupportedModelError(f"{path}: rope_type {kind!r} is not supported; supported: default, linear, llama3, yarn")
    # llama_4_scaling_beta is Ministral3's query scaling, handled by the builder; not a RoPE parameter
    not_rope = ("rope_theta", "type", "partial_rotary_factor", "llama_4_scaling_beta", "max_position_embeddings")
    out = {k: v for k, v in params.items() if k not in not_rope}
    out["rope_type"] = kind
    if kind in ("llama3", "yarn"):
        out.setdefault("original_max_position_embeddings",
                       config.get("original_max_position_embeddings", config.get("max_position_embeddings")))
    if kind == "yarn" and out.get("factor") is None:
        out["factor"] = config["max_position_embeddings"] / out["original_max_position_embeddings"]
    return {"theta": float(theta), "rotary_dim": rotary_dim, "scaling": out}


def _layer_windows(config: dict, num_layers: int) -> list[int]:
    window = config.get("sliding_window") or 0
    types = config.get("layer_types")
    if types:
        return [window if t == "sliding_attention" else 0 for t in types]
    if "use_sliding_window" in config:  # Qwen2/Qwen3 v4 configs
        start = config.get("max_window_layers", num_layers)
        return [window if config["use_sliding_window"] and i >= start else 0 for i in range(num_layers)]
    return [window] * num_layers  # Mistral: one window for all layers, or none


# Vision-language wrappers compiled text-only: accepted text model types, the prefixes of the text
# model's tensors (both the transformers v5 and the older layout), and the towers left out.
_WRAPPERS = {
    "Mistral3ForConditionalGeneration": {
        "text_model_types": {"mistral": "MistralForCausalLM", "ministral3": "Ministral3ForCausalLM"},
        "prefixes": (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head.")),
        "ignore": ((r"(model\.)?vision_tower\..*", "vision tower: rdnac compiles the text model only (images are "
                    "not supported yet)"),
                   (r"(model\.)?multi_modal_projector\..*", "multimodal projector: rdnac compiles the text model only "
                    "(images are not supported yet)")),
    },
}


def _text_architecture(b: GraphBuilder, arch: str, c: dict, path) -> str:
    """The causal-LM architecture whose graph is built; for a wrapper, maps its tensors and ignores its towers."""
    wrapper = _WRAPPERS.get(arch)
    if wrapper is None:
        return arch
    model_type = c.get("model_type")
    text_arch = wrapper["text_model_types"].get(model_type)
    if text_arch is None:
        raise UnsupportedModelError(f"{path}: {arch} requires text_config.model_type in "
                                    f"{sorted(wrapper['text_model_types'])}; got {model_type!r}")
    for prefix, canonical in wrapper["prefixes"]:
        b.alias_prefix(prefix, canonical)
    for pattern, reason in wrapper["ignore"]:
        b.ignore(pattern, reason)
    b.decide("model", f"{arch}: text model only, as {text_arch}", "the vision tower and projector are not compiled")
    return text_arch


def _max_positions(b: GraphBuilder, c: dict, rope_params: dict) -> int:
    """Ministral3 multiplies queries by 1 + beta*log(1 + floor(pos / original_max_position_embeddings)); that is
    exactly 1 below original_max_position_embeddings, so the plan is limited to those positions until the IR
    carries position-dependent query scaling."""
    limit = c.get("max_position_embeddings", 4096)
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


def build(checkpoint: Checkpoint, dtype: str):
    c = checkpoint.config
    arch = next(a for a in c["architectures"] if a in ARCHITECTURES)
    path = checkpoint.path
    b = GraphBuilder(checkpoint, dtype)
    text_arch = _text_architecture(b, arch, c, path)
    hidden, num_layers = c["hidden_size"], c["num_hidden_layers"]
    num_heads = c["num_attention_heads"]
    num_kv_heads = c.get("num_key_value_heads") or num_heads
    head_dim = c.get("head_dim") or hidden // num_heads
    inter, vocab, eps = c["intermediate_size"], c["vocab_size"], c.get("rms_norm_eps", 1e-6)
    act = _ACTS.get(c.get("hidden_act", "silu"))
    if act is None:
        raise UnsupportedModelError(f"{path}: hidden_act {c.get('hidden_act')!r} is not supported; supported: {sorted(_ACTS)}")
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(f"{path}: num_attention_heads {num_heads} requires a multiple of "
                                    f"num_key_value_heads; got {num_kv_heads}")
    qkv_bias = text_arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias"))
    o_bias = text_arch != "Qwen2ForCausalLM" and bool(c.get("attention_bias"))
    mlp_bias = bool(c.get("mlp_bias"))
    has_qk_norm = text_arch == "Qwen3ForCausalLM"
    rope = rope_config(c, head_dim, path)
    max_positions = _max_positions(b, c, dict(c.get("rope_parameters") or c.get("rope_scaling") or {}))
    windows = _layer_windows(c, num_layers)
    tied = c.get("tie_word_embeddings", False)

    b.ignore(r".*rotary_emb\.inv_freq", "RoPE frequencies are recomputed from config.json")
    if tied:
        b.ignore(r"lm_head\.weight", "tie_word_embeddings: the logits reuse model.embed_tokens.weight")
    token_ids = b.input("token_ids", "int64", ("T",))
    positions = b.input("positions", "int64", ("T",))
    slots = b.input("slot_mapping", "int64", ("T",))
    block_tables = b.input("block_tables", "int32", ("B", "MB"))
    seq_lens = b.input("seq_lens", "int32", ("B",))
    cu_seqlens = b.input("cu_seqlens_q", "int32", ("B1",))
    logits_indices = b.input("logits_indices", "int64", ("R",))

    h = b.node("embedding", [token_ids, b.weight("model.embed_tokens.weight", (vocab, hidden))], "embed")[0]
    for i in range(num_layers):
        p, n = f"model.layers.{i}", f"layers.{i}"
        x = b.node("rms_norm", [h, b.weight(f"{p}.input_layernorm.weight", (hidden,))], f"{n}.input_norm", eps=eps)[0]
        q = b.linear(x, f"{p}.self_attn.q_proj", num_heads * head_dim, hidden, qkv_bias, f"{n}.q_proj")
        k = b.linear(x, f"{p}.self_attn.k_proj", num_kv_heads * head_dim, hidden, qkv_bias, f"{n}.k_proj")
        v = b.linear(x, f"{p}.self_attn.v_proj", num_kv_heads * head_dim, hidden, qkv_bias, f"{n}.v_proj")
        if has_qk_norm:
            q = b.node("head_rms_norm", [q, b.weight(f"{p}.self_attn.q_norm.weight", (head_dim,))], f"{n}.q_norm",
                       num_heads=num_heads, head_dim=head_dim, eps=eps)[0]
            k = b.node("head_rms_norm", [k, b.weight(f"{p}.self_attn.k_norm.weight", (head_dim,))], f"{n}.k_norm",
                       num_heads=num_kv_heads, head_dim=head_dim, eps=eps)[0]
        q, k = b.node("rope", [q, k, positions], f"{n}.rope", 2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, rotary_dim=rope["rotary_dim"], theta=rope["theta"], style="neox",
                      scaling=rope["scaling"])
        k_cache = b.state_input(f"k_cache.{i}", "paged_kv", i, dtype, (num_kv_heads, head_dim))
        v_cache = b.state_input(f"v_cache.{i}", "paged_kv", i, dtype, (num_kv_heads, head_dim))
        b.node("kv_cache_write", [k, v, slots, k_cache, v_cache], f"{n}.kv_write", 0,
               num_kv_heads=num_kv_heads, head_dim=head_dim)
        a = b.node("attention", [q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, positions], f"{n}.attn",
                   num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=head_dim ** -0.5,
                   sliding_window=windows[i], softcap=0.0)[0]
        o = b.linear(a, f"{p}.self_attn.o_proj", hidden, num_heads * head_dim, o_bias, f"{n}.o_proj")
        h = b.node("add", [h, o], f"{n}.attn_residual")[0]
        x = b.node("rms_norm", [h, b.weight(f"{p}.post_attention_layernorm.weight", (hidden,))], f"{n}.post_norm",
                   eps=eps)[0]
        g = b.linear(x, f"{p}.mlp.gate_proj", inter, hidden, mlp_bias, f"{n}.gate_proj")
        u = b.linear(x, f"{p}.mlp.up_proj", inter, hidden, mlp_bias, f"{n}.up_proj")
        m = b.node("gated_act", [g, u], f"{n}.act", act=act)[0]
        d = b.linear(m, f"{p}.mlp.down_proj", hidden, inter, mlp_bias, f"{n}.down_proj")
        h = b.node("add", [h, d], f"{n}.mlp_residual")[0]
    x = b.node("rms_norm", [h, b.weight("model.norm.weight", (hidden,))], "final_norm", eps=eps)[0]
    head = "model.embed_tokens.weight" if tied else b.weight("lm_head.weight", (vocab, hidden))
    b.node("logits", [x, logits_indices, head], "logits")
    if any(windows):
        b.decide("attention", "sliding window", f"per-layer windows {sorted(set(windows))} from config.json")
    attrs = {"architecture": arch, "num_layers": num_layers, "hidden_size": hidden, "num_heads": num_heads,
             "num_kv_heads": num_kv_heads, "head_dim": head_dim, "vocab_size": vocab, "intermediate_size": inter,
             "max_position_embeddings": max_positions, "dtype": dtype,
             "tie_word_embeddings": bool(tied)}
    return (*b.finish(["logits"], attrs), b.decisions)


ARCHITECTURES = {name: build for name in
                 ("LlamaForCausalLM", "MistralForCausalLM", "Ministral3ForCausalLM", "Qwen2ForCausalLM",
                  "Qwen3ForCausalLM", *_WRAPPERS)}
