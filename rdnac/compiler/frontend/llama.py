"""Llama-family graph builder: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

One decoder layer: rms_norm -> q/k/v linears -> [q/k norm] -> rope ->
kv_cache_write -> attention -> o linear -> add -> rms_norm -> gate/up
linears -> gated_act -> down linear -> add. The residual adds are emitted
unfused; the fuse_add_rms_norm pass merges them into the following norm.
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
    out = {k: v for k, v in params.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
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


def build(checkpoint: Checkpoint, dtype: str):
    c = checkpoint.config
    arch = next(a for a in c["architectures"] if a in ARCHITECTURES)
    path = checkpoint.path
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
    if c.get("quantization_config"):
        raise UnsupportedModelError(f"{path}: quantized checkpoints ({c['quantization_config'].get('quant_method')}) "
                                    "are not supported yet; use a bf16/fp16/fp32 checkpoint")
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias"))
    o_bias = arch != "Qwen2ForCausalLM" and bool(c.get("attention_bias"))
    mlp_bias = bool(c.get("mlp_bias"))
    has_qk_norm = arch == "Qwen3ForCausalLM"
    rope = rope_config(c, head_dim, path)
    windows = _layer_windows(c, num_layers)
    tied = c.get("tie_word_embeddings", False)

    b = GraphBuilder(checkpoint, dtype)
    b.ignore(r".*rotary_emb\.inv_freq", "RoPE frequencies are recomputed from config.json")
    if tied:
        b.ignore(r"lm_head\.weight", "tie_word_embeddings: the logits reuse model.embed_tokens.weight")
    cache_shape = ("NB", "BS", num_kv_heads, head_dim)
    token_ids = b.input("token_ids", "int64", ("T",))
    positions = b.input("positions", "int64", ("T",))
    slots = b.input("slot_mapping", "int64", ("T",))
    block_tables = b.input("block_tables", "int32", ("B", "MB"))
    seq_lens = b.input("seq_lens", "int32", ("B",))
    cu_seqlens = b.input("cu_seqlens_q", "int32", ("B1",))
    logits_indices = b.input("logits_indices", "int64", ("R",))

    def linear(x: str, prefix: str, out_f: int, in_f: int, bias: bool, name: str) -> str:
        ins = [x, b.weight(f"{prefix}.weight", (out_f, in_f))]
        if bias:
            ins.append(b.weight(f"{prefix}.bias", (out_f,)))
        return b.node("linear", ins, name)[0]

    h = b.node("embedding", [token_ids, b.weight("model.embed_tokens.weight", (vocab, hidden))], "embed")[0]
    for i in range(num_layers):
        p, n = f"model.layers.{i}", f"layers.{i}"
        x = b.node("rms_norm", [h, b.weight(f"{p}.input_layernorm.weight", (hidden,))], f"{n}.input_norm", eps=eps)[0]
        q = linear(x, f"{p}.self_attn.q_proj", num_heads * head_dim, hidden, qkv_bias, f"{n}.q_proj")
        k = linear(x, f"{p}.self_attn.k_proj", num_kv_heads * head_dim, hidden, qkv_bias, f"{n}.k_proj")
        v = linear(x, f"{p}.self_attn.v_proj", num_kv_heads * head_dim, hidden, qkv_bias, f"{n}.v_proj")
        if has_qk_norm:
            q = b.node("head_rms_norm", [q, b.weight(f"{p}.self_attn.q_norm.weight", (head_dim,))], f"{n}.q_norm",
                       num_heads=num_heads, head_dim=head_dim, eps=eps)[0]
            k = b.node("head_rms_norm", [k, b.weight(f"{p}.self_attn.k_norm.weight", (head_dim,))], f"{n}.k_norm",
                       num_heads=num_kv_heads, head_dim=head_dim, eps=eps)[0]
        q, k = b.node("rope", [q, k, positions], f"{n}.rope", 2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, rotary_dim=rope["rotary_dim"], theta=rope["theta"], style="neox",
                      scaling=rope["scaling"])
        k_cache = b.input(f"k_cache.{i}", dtype, cache_shape)
        v_cache = b.input(f"v_cache.{i}", dtype, cache_shape)
        b.node("kv_cache_write", [k, v, slots, k_cache, v_cache], f"{n}.kv_write", 0,
               num_kv_heads=num_kv_heads, head_dim=head_dim)
        a = b.node("attention", [q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, positions], f"{n}.attn",
                   num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=head_dim ** -0.5,
                   sliding_window=windows[i], softcap=0.0)[0]
        o = linear(a, f"{p}.self_attn.o_proj", hidden, num_heads * head_dim, o_bias, f"{n}.o_proj")
        h = b.node("add", [h, o], f"{n}.attn_residual")[0]
        x = b.node("rms_norm", [h, b.weight(f"{p}.post_attention_layernorm.weight", (hidden,))], f"{n}.post_norm",
                   eps=eps)[0]
        g = linear(x, f"{p}.mlp.gate_proj", inter, hidden, mlp_bias, f"{n}.gate_proj")
        u = linear(x, f"{p}.mlp.up_proj", inter, hidden, mlp_bias, f"{n}.up_proj")
        m = b.node("gated_act", [g, u], f"{n}.act", act=act)[0]
        d = linear(m, f"{p}.mlp.down_proj", hidden, inter, mlp_bias, f"{n}.down_proj")
        h = b.node("add", [h, d], f"{n}.mlp_residual")[0]
    x = b.node("rms_norm", [h, b.weight("model.norm.weight", (hidden,))], "final_norm", eps=eps)[0]
    head = "model.embed_tokens.weight" if tied else b.weight("lm_head.weight", (vocab, hidden))
    b.node("logits", [x, logits_indices, head], "logits")
    if any(windows):
        b.decide("attention", "sliding window", f"per-layer windows {sorted(set(windows))} from config.json")
    attrs = {"architecture": arch, "num_layers": num_layers, "hidden_size": hidden, "num_heads": num_heads,
             "num_kv_heads": num_kv_heads, "head_dim": head_dim, "vocab_size": vocab, "intermediate_size": inter,
             "max_position_embeddings": c.get("max_position_embeddings", 4096), "dtype": dtype,
             "tie_word_embeddings": bool(tied)}
    return (*b.finish(["logits"], attrs), b.decisions)


ARCHITECTURES = {name: build for name in
                 ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}
