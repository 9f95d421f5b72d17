"""The multi-head latent attention body (`MLA`) of DeepSeek V2/V3, over the ops of `rdnac.ir.mla`.

    q      = q_b_proj(q_a_layernorm(q_a_proj(x)))     (q LoRA; or q_proj(x) without it)  [T, H*(Dn+Dr)]
    latent, k_pe = split(kv_a_proj_with_mqa(x), [R, Dr])
    latent = kv_a_layernorm(latent)
    mla_cache_write(latent, k_pe, positions, slot_mapping, latent_cache)   (k_pe rotated there)
    out    = o_proj(mla_attention(q, latent_cache, ..., kv_b_proj.weight))

The layer declares one `paged_latent` state entry of R + Dr per token (the
whole KV cache of the layer). kv_b_proj is read in the compute dtype (an FP8
one is dequantized once): the expanded form applies it as a matrix and the
absorbed form's per-head weights are regrouped from it (passes/mla_forms.py).
The two LoRA norms use transformers' default eps 1e-6, not rms_norm_eps
(DeepseekV3RMSNorm(q_lora_rank) / (kv_lora_rank) take no eps argument).
Dims are checked against the tensors before any weight is read, naming
kv_lora_rank / q_lora_rank when they do not match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rdnac.compiler.frontend.blocks import Model
from rdnac.compiler.frontend.spec import AttentionLayer, config_file, flag, rope_config
from rdnac.errors import CheckpointError, UnsupportedModelError

LORA_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLADims:
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


def mla_dims(c: dict, path) -> MLADims:
    where = config_file(path)
    keys = ("num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    for key in keys:
        if not isinstance(c.get(key), int) or c[key] < 1:
            raise UnsupportedModelError(f"{where}: {key} requires a positive integer for multi-head latent "
                                        f"attention; got {c.get(key)!r}")
    q_lora = c.get("q_lora_rank")
    if q_lora is not None and (not isinstance(q_lora, int) or q_lora < 1):
        raise UnsupportedModelError(f"{where}: q_lora_rank requires null or a positive integer; got {q_lora!r}")
    if c["qk_rope_head_dim"] % 2:
        raise UnsupportedModelError(f"{where}: qk_rope_head_dim requires an even number; got {c['qk_rope_head_dim']}")
    return MLADims(c["num_attention_heads"], q_lora, *(c[k] for k in keys[1:]))


def mla_attention_layers(c: dict, path, style: str) -> list[AttentionLayer]:
    """Every layer's RoPE (on the Dr rotary dims) and softmax scale: (Dn + Dr)^-0.5, times mscale^2 under
    YaRN with mscale_all_dim (transformers' yarn_apply_mscale, DeepSeek's softmax scale correction)."""
    d = mla_dims(c, path)
    rope = {**rope_config(c, d.qk_rope_head_dim, path), "style": style}
    scale = (d.qk_nope_head_dim + d.qk_rope_head_dim) ** -0.5
    scaling = rope["scaling"]
    if scaling and scaling.get("mscale_all_dim"):
        factor = scaling["factor"]
        mscale = 0.1 * scaling["mscale_all_dim"] * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    return [AttentionLayer(0, rope, scale) for _ in range(c["num_hidden_layers"])]


@dataclass(frozen=True)
class MLA:
    """DeepSeek's attention: LoRA-compressed queries (or one q_proj), one latent per token in the cache."""

    bias: bool | str = "attention_bias"  # on q_a_proj, kv_a_proj_with_mqa and o_proj (transformers)

    def emit(self, m: Model, x: str, layer: int) -> str:
        b, c, variant, s = m.b, m.config, m.attention[layer], m.step
        d = mla_dims(c, b.checkpoint.path)
        p, n = f"model.layers.{layer}.self_attn", f"layers.{layer}"
        heads, rank, dn, dr, dv = d.num_heads, d.kv_lora_rank, d.qk_nope_head_dim, d.qk_rope_head_dim, d.v_head_dim
        self._check_ranks(m, p, d)
        bias = flag(c, self.bias)
        if d.q_lora_rank:
            qa = b.linear(x, f"{p}.q_a_proj", d.q_lora_rank, m.hidden, bias, f"{n}.q_a_proj")
            qa = b.node("rms_norm", [qa, b.weight(f"{p}.q_a_layernorm.weight", (d.q_lora_rank,))], f"{n}.q_a_norm",
                        eps=LORA_NORM_EPS)[0]
            q = b.linear(qa, f"{p}.q_b_proj", heads * (dn + dr), d.q_lora_rank, False, f"{n}.q_b_proj")
        else:
            q = b.linear(x, f"{p}.q_proj", heads * (dn + dr), m.hidden, False, f"{n}.q_proj")
        kv = b.linear(x, f"{p}.kv_a_proj_with_mqa", rank + dr, m.hidden, bias, f"{n}.kv_a_proj")
        latent, k_pe = b.node("split", [kv], f"{n}.kv_a_split", 2, sizes=[rank, dr])
        latent = b.node("rms_norm", [latent, b.weight(f"{p}.kv_a_layernorm.weight", (rank,))], f"{n}.kv_a_norm",
                        eps=LORA_NORM_EPS)[0]
        rope = {"theta": variant.rope["theta"], "scaling": variant.rope["scaling"], "style": variant.rope["style"]}
        cache = b.state_input(f"latent_cache.{layer}", "paged_latent", layer, m.dtype, (rank + dr,))
        b.node("mla_cache_write", [latent, k_pe, s["positions"], s["slot_mapping"], cache], f"{n}.latent_write", 0,
               kv_lora_rank=rank, qk_rope_head_dim=dr, **rope)
        kv_b = b.weight(f"{p}.kv_b_proj.weight", (heads * (dn + dv), rank),
                        why_float="mla_attention reads kv_b_proj in the compute dtype (its absorbed per-head "
                                  "weights are regrouped from it)")
        a = b.node("mla_attention", [q, cache, s["block_tables"], s["seq_lens"], s["cu_seqlens_q"], s["positions"],
                                     kv_b], f"{n}.attn",
                   num_heads=heads, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, kv_lora_rank=rank,
                   scale=variant.scale, **rope)[0]
        return b.linear(a, f"{p}.o_proj", m.hidden, heads * dv, bias, f"{n}.o_proj")

    @staticmethod
    def _check_ranks(m: Model, p: str, d: MLADims) -> None:
        """kv_lora_rank (and q_lora_rank) against the tensors, naming the config key rather than a shape."""
        b, b_path = m.b, m.b.checkpoint.path
        checks = [(f"{p}.kv_a_proj_with_mqa.weight", 0, d.kv_lora_rank + d.qk_rope_head_dim,
                   "kv_lora_rank + qk_rope_head_dim", f"{d.kv_lora_rank} + {d.qk_rope_head_dim}", "kv_lora_rank"),
                  (f"{p}.kv_b_proj.weight", 1, d.kv_lora_rank, "kv_lora_rank", str(d.kv_lora_rank), "kv_lora_rank"),
                  (f"{p}.kv_a_layernorm.weight", 0, d.kv_lora_rank, "kv_lora_rank", str(d.kv_lora_rank),
                   "kv_lora_rank")]
        if d.q_lora_rank:
            checks.append((f"{p}.q_a_proj.weight", 0, d.q_lora_rank, "q_lora_rank", str(d.q_lora_rank),
                           "q_lora_rank"))
        elif b.has(f"{p}.q_a_proj.weight"):
            raise CheckpointError(f"{config_file(b_path)}: q_lora_rank is null but the checkpoint has "
                                  f"{p}.q_a_proj.weight (a q LoRA); set q_lora_rank to match the checkpoint")
        for name, dim, want, what, value, key in checks:
            shape = b.shape_of(name)
            if shape is not None and len(shape) > dim and shape[dim] != want:
                raise CheckpointError(f"{config_file(b_path)}: {what} ({value} = {want}) requires tensor {name!r} "
                                      f"with {want} {'rows' if dim == 0 else 'columns'}; got shape {list(shape)}; "
                                      f"fix {key} to match the checkpoint")
