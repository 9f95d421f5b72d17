"""Random checkpoints of real shapes for the hybrid (Qwen3.5) and MLA (DeepSeek) families, for GPU benchmarks.

    write_random_family_checkpoint(out_dir, "qwen3.5-27b", layers=4)                 # bf16
    write_random_family_checkpoint(out_dir, "deepseek-v3", layers=2, scheme="fp8-block")

What a checkpoint holds is what transformers' `save_pretrained` writes for the
same config: the tensor names and shapes come from transformers' model built on
the meta device (no memory), with its fused experts (`experts.gate_up_proj`
[E, 2I, H], `experts.down_proj` [E, H, I]) split back into the Hub's
per-expert `experts.J.{gate,up,down}_proj.weight`, as save_pretrained does
(tests/test_bench_families.py checks the two agree at tiny sizes). Values are
random at sane scales (a linear's rows ~ N(0, 1/fan_in), norms near 1), drawn
on `device` (the GPU when there is one: a 30 GB checkpoint is generated in
seconds there and in minutes on a cpu) and written one layer per shard, as
`rdnac.testing.moe` does for Qwen3-MoE and GPT-OSS.

Scheme fp8-block writes DeepSeek-V3's native layout (`rdnac.testing.deepseek`):
each decoder linear F8_E4M3 with a float32 `weight_scale_inv`
[ceil(N/128), ceil(K/128)] that multiplies it. The codes are N(0, 16) cast to
e4m3 and every block's scale is fan_in^-0.5 / 16: not a quantization of
anything, but the layout, dtypes and magnitudes of one, generated at the
GPU's speed. `layers` cuts the depth; every layer keeps its real width, and
`layer_types` (Qwen3.5) keeps the model's own period from layer 0. Same seed
and device, same bytes.

SHAPES holds the real configs (HF's config keys) and a tiny variant of each
(same structure, small widths) for cpu tests of the harness.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from rdnac.testing.deepseek import QUANTIZATION_CONFIG, is_fp8_linear
from rdnac.testing.fp8 import _StreamingSafetensors, _write_byte_tokenizer

_PERIOD = ["linear_attention"] * 3 + ["full_attention"]
_QWEN3_5 = dict(head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                linear_conv_kernel_dim=4, vocab_size=248320, max_position_embeddings=262144, rms_norm_eps=1e-6,
                tie_word_embeddings=False, attn_output_gate=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25})
_V2_LITE = dict(hidden_size=2048, intermediate_size=10944, num_hidden_layers=27, num_attention_heads=16,
                num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1408, n_routed_experts=64,
                n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1,
                topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False, vocab_size=102400,
                max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                                 "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1})
_V3 = dict(hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
           num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
           v_head_dim=128, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
           num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4, routed_scaling_factor=2.5,
           norm_topk_prob=True, vocab_size=129280, max_position_embeddings=163840, rms_norm_eps=1e-6,
           tie_word_embeddings=False,
           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                            "beta_fast": 32, "beta_slow": 1})
_TINY_QWEN3_5 = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                     linear_value_head_dim=16, vocab_size=512, max_position_embeddings=4096)
_TINY_MLA = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                 n_routed_experts=8, num_experts_per_tok=2, vocab_size=512, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 0.707,
                                  "mscale_all_dim": 0.707, "original_max_position_embeddings": 512,
                                  "beta_fast": 32, "beta_slow": 1})

# name: (model_type, architecture, config). Qwen3.5-9B's widths are its published config's as recalled (hidden
# 4096, 32 layers, 16 heads of 256, 4 KV heads, intermediate 12288, GDN 16 key / 32 value heads of 128).
SHAPES = {
    "qwen3.5-9b": ("qwen3_5_text", "Qwen3_5ForCausalLM", dict(
        _QWEN3_5, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, linear_num_value_heads=32)),
    "qwen3.5-27b": ("qwen3_5_text", "Qwen3_5ForCausalLM", dict(
        _QWEN3_5, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64, num_attention_heads=24,
        num_key_value_heads=4, linear_num_value_heads=48)),
    "qwen3.5-35b-a3b": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", dict(
        _QWEN3_5, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
        linear_num_value_heads=32, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, norm_topk_prob=True)),
    "deepseek-v2-lite": ("deepseek_v2", "DeepseekV2ForCausalLM", _V2_LITE),
    "deepseek-v3": ("deepseek_v3", "DeepseekV3ForCausalLM", _V3),
    "qwen3.5-tiny": ("qwen3_5_text", "Qwen3_5ForCausalLM", dict(_QWEN3_5, **_TINY_QWEN3_5, num_hidden_layers=4)),
    "qwen3.5-moe-tiny": ("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", dict(
        _QWEN3_5, **_TINY_QWEN3_5, num_hidden_layers=4, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, shared_expert_intermediate_size=32, norm_topk_prob=True)),
    "deepseek-v2-tiny": ("deepseek_v2", "DeepseekV2ForCausalLM", dict(_V2_LITE, **_TINY_MLA, num_hidden_layers=2,
                                                                      n_shared_experts=1)),
    "deepseek-v3-tiny": ("deepseek_v3", "DeepseekV3ForCausalLM", dict(
        _V3, **{**_TINY_MLA, "intermediate_size": 256, "moe_intermediate_size": 128, "hidden_size": 128},
        q_lora_rank=48, num_hidden_layers=2, first_k_dense_replace=1, n_group=4, topk_group=2)),
}


def hf_config(shape: str, layers: int | None = None, **overrides):
    """transformers' config of `shape` with `layers` decoder layers (default: the model's own) and any other
    config keys replaced by `overrides` (narrower build checks at real per-head widths)."""
    from transformers import AutoConfig

    model_type, arch, config = SHAPES[shape]
    config = {**config, **overrides}
    if layers:
        config["num_hidden_layers"] = layers
        config["first_k_dense_replace"] = min(config.get("first_k_dense_replace", 0), layers - 1)
    if model_type.startswith("qwen3_5"):
        config["layer_types"] = [_PERIOD[i % 4] for i in range(config["num_hidden_layers"])]
    if not model_type.startswith("deepseek"):
        config.pop("first_k_dense_replace", None)
    cfg = AutoConfig.for_model(model_type, **config)
    cfg.architectures = [arch]
    cfg.dtype = "bfloat16"
    return cfg


def tensor_specs(cfg) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor save_pretrained writes for `cfg` in bf16, fused experts split."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    # the per-expert shapes come from the config, not the fused tensor's orientation (which transformers
    # versions have changed); only the expert count is read from it
    h, inter = cfg.hidden_size, getattr(cfg, "moe_intermediate_size", None)
    specs = []
    for name, t in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".experts") and leaf == "gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
            for j in range(t.shape[0]):
                specs += [(f"{prefix}.{j}.gate_proj.weight", t.dtype, (inter, h)),
                          (f"{prefix}.{j}.up_proj.weight", t.dtype, (inter, h))]
        elif prefix.endswith(".experts") and leaf == "down_proj":  # [E, H, I]
            specs += [(f"{prefix}.{j}.down_proj.weight", t.dtype, (h, inter)) for j in range(t.shape[0])]
        else:
            specs.append((name, t.dtype, tuple(t.shape)))
    return specs


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def _random(name: str, shape: tuple[int, ...], seed: int, device: str, part: int = 0) -> torch.Tensor:
    """float32 values of tensor `name` (of its rows from `part` on) on `device`, at the scale a trained
    model's would have."""
    g = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}/{name}@{part}".encode()))
    x = torch.randn(shape, generator=g, device=device)
    if name.endswith(("norm.weight", "layernorm.weight")):
        return 1.0 + 0.1 * x
    if name.endswith(("bias", "dt_bias", "A_log")):
        return 0.1 * x
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return 0.02 * x
    return x * shape[-1] ** -0.5 if len(shape) > 1 else x  # conv1d [C, 1, K]: fan-in K


def write_random_family_checkpoint(out_dir: str | Path, shape: str, layers: int | None = None,
                                   scheme: str = "bf16", seed: int = 0, device: str | None = None,
                                   **overrides) -> Path:
    """Config, tokenizer and one safetensors shard per layer (plus embeddings and head) of `shape`, its config
    keys replaced by `overrides`."""
    if scheme not in ("bf16", "fp8-block") or (scheme == "fp8-block" and not SHAPES[shape][0].startswith("deepseek")):
        raise ValueError(f"scheme requires bf16 (any shape) or fp8-block (DeepSeek shapes); got {scheme!r} for {shape}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = hf_config(shape, layers, **overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[int, list] = {}
    for name, dtype, tensor_shape in tensor_specs(cfg):
        layer = _layer_of(name)
        key = -1 if layer is None and "embed" in name else (10**6 if layer is None else layer)
        fp8 = scheme == "fp8-block" and is_fp8_linear(name)
        shards.setdefault(key, []).append((name, torch.float8_e4m3fn if fp8 else dtype, tensor_shape))
        if fp8:
            grid = tuple(-(-d // 128) for d in tensor_shape)
            shards[key].append((name.removesuffix(".weight") + ".weight_scale_inv", torch.float32, grid))
    weight_map = {}
    keys = sorted(shards)
    for index, key in enumerate(keys):
        filename = f"model-{index + 1:05d}-of-{len(keys):05d}.safetensors"
        writer = _StreamingSafetensors(out / filename, shards[key])
        for name, dtype, tensor_shape in shards[key]:
            weight_map[name] = filename
            if name.endswith(".weight_scale_inv"):
                k = tensor_shape[1] * 128  # the weight's K rounded up to blocks: fan-in within 1%
                writer.write(name, torch.full(tensor_shape, k ** -0.5 / 16))
            elif dtype == torch.float8_e4m3fn:
                writer.write(name, (16 * torch.randn(tensor_shape, device=device, generator=torch.Generator(device)
                                     .manual_seed(zlib.crc32(f"{seed}/{name}".encode()))))
                             .clamp(-448, 448).to(dtype).cpu())
            else:
                rows = 16384 if len(tensor_shape) == 2 else tensor_shape[0]  # the [V, H] tables in row chunks
                for start in range(0, tensor_shape[0], rows):
                    part = (min(rows, tensor_shape[0] - start), *tensor_shape[1:])
                    writer.write(name, _random(name, part, seed, device, start).to(dtype).cpu())
        writer.close()
    config = cfg.to_dict()
    if scheme == "fp8-block":
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_byte_tokenizer(out)
    return out
