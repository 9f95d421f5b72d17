"""DeepSeek checkpoints in the native FP8 block layout, for tests (and, at real shapes, GPU benchmarks).

    deq = write_fp8_block_checkpoint(float_dir, out_dir, seed=0)   # -> dequantized weights (float32)
    write_random_v3_fp8_block(out_dir, layers=2)                   # DeepSeek-V3's widths, fewer layers

What DeepSeek-V3/R1's released FP8 checkpoints hold, and so what this writes:
every linear of a decoder layer (q_a_proj, q_b_proj or q_proj,
kv_a_proj_with_mqa, kv_b_proj, o_proj; the dense MLP's, the shared experts'
and each routed expert's gate/up/down_proj) as F8_E4M3 with a float32
`weight_scale_inv` [ceil(N/128), ceil(K/128)] that multiplies it; the
router (`mlp.gate.weight`), its `e_score_correction_bias`, norms, embeddings
and lm_head as they were. `quantization_config` is V3's: quant_method fp8,
fmt e4m3, activation_scheme dynamic, weight_block_size [128, 128], and no
modules_to_not_convert (the router is not an nn.Linear in DeepSeek's code).
Scales are amax/448 times a seeded factor in [1, 1.25) (rdnac.testing.fp8),
so a scale applied to the wrong tensor shows. The returned dequantized
tensors (every tensor of the checkpoint) are the reference's weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdnac.ir.fp8 import dequantize_weight
from rdnac.testing.fp8 import _quantize

BLOCK = [128, 128]
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": BLOCK}
_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(.+\.)?\w*proj(_with_mqa)?\.weight")


def is_fp8_linear(name: str) -> bool:
    return _LINEAR.fullmatch(name) is not None


def write_fp8_block_checkpoint(src: str | Path, out_dir: str | Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Quantize the float DeepSeek checkpoint in `src` into `out_dir` in the native FP8 block layout;
    returns every tensor dequantized to float32."""
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    written, dequantized = {}, {}
    for name, t in sorted(tensors.items()):
        if not is_fp8_linear(name):
            written[name], dequantized[name] = t.contiguous(), t.float()
            continue
        bits, scale, weight_scheme, block = _quantize(name, t.float(), "fp8-block", seed)
        written[name] = bits
        written[name.removesuffix(".weight") + ".weight_scale_inv"] = scale  # multiplies the weight
        dequantized[name] = dequantize_weight(bits, scale, weight_scheme, block)
    save_file(written, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / side).exists():
            shutil.copyfile(src / side, out / side)
    return dequantized


# DeepSeek-V3 / R1 as released (config.json of deepseek-ai/DeepSeek-V3), less the multi-token-prediction layer
V3_SHAPE = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_attention_heads=128,
                num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
                topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=512, q_lora_rank=1536,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, vocab_size=129280, rms_norm_eps=1e-6,
                first_k_dense_replace=3, max_position_embeddings=163840, rope_theta=10000.0,
                rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def _v3_layer_specs(i: int, c: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, kind, shape) of decoder layer i: kind "norm", "fp8" (a linear with its weight_scale_inv after
    it), "router" or "bias" (the router's float32 e_score_correction_bias)."""
    h, p = c["hidden_size"], f"model.layers.{i}"
    heads, nope, rope, v = (c[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                           "v_head_dim"))
    rank, q_rank = c["kv_lora_rank"], c["q_lora_rank"]
    specs = [(f"{p}.input_layernorm.weight", "norm", (h,)), (f"{p}.post_attention_layernorm.weight", "norm", (h,)),
             (f"{p}.self_attn.q_a_proj.weight", "fp8", (q_rank, h)), (f"{p}.self_attn.q_a_layernorm.weight", "norm",
                                                                       (q_rank,)),
             (f"{p}.self_attn.q_b_proj.weight", "fp8", (heads * (nope + rope), q_rank)),
             (f"{p}.self_attn.kv_a_proj_with_mqa.weight", "fp8", (rank + rope, h)),
             (f"{p}.self_attn.kv_a_layernorm.weight", "norm", (rank,)),
             (f"{p}.self_attn.kv_b_proj.weight", "fp8", (heads * (nope + v), rank)),
             (f"{p}.self_attn.o_proj.weight", "fp8", (h, heads * v))]
    mlp = lambda prefix, inter: [(f"{prefix}.gate_proj.weight", "fp8", (inter, h)),  # noqa: E731
                                 (f"{prefix}.up_proj.weight", "fp8", (inter, h)),
                                 (f"{prefix}.down_proj.weight", "fp8", (h, inter))]
    if i < c["first_k_dense_replace"]:
        return specs + mlp(f"{p}.mlp", c["intermediate_size"])
    e, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    specs += [(f"{p}.mlp.gate.weight", "router", (e, h)), (f"{p}.mlp.gate.e_score_correction_bias", "bias", (e,))]
    for j in range(e):
        specs += mlp(f"{p}.mlp.experts.{j}", inter)
    return specs + mlp(f"{p}.mlp.shared_experts", inter * c["n_shared_experts"])


def _random_fp8_block(shape: tuple[int, int], g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [N, K] linear of std K**-0.5 quantized per 128x128 block: (e4m3fn bits, float32 scales)."""
    n, k = shape
    nb, kb = -(-n // BLOCK[0]), -(-k // BLOCK[1])
    w = torch.randn((n, k), generator=g).to(device) * k ** -0.5
    blocks = torch.nn.functional.pad(w, (0, kb * BLOCK[1] - k, 0, nb * BLOCK[0] - n)).reshape(nb, BLOCK[0], kb,
                                                                                                 BLOCK[1])
    scale = blocks.abs().amax((1, 3)).clamp(min=1e-12) / 448.0  # [nb, kb]
    bits = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return bits.reshape(nb * BLOCK[0], kb * BLOCK[1])[:n, :k].contiguous().cpu(), scale.float().cpu()


def write_random_v3_fp8_block(out_dir: str | Path, layers: int = 2, first_k_dense_replace: int = 1, seed: int = 0,
                              device: str = "cpu", **overrides) -> Path:
    """A DeepSeek-V3-shaped checkpoint in the native FP8 block layout with `layers` decoder layers (the first
    `first_k_dense_replace` dense, then MoE layers of 256 experts), random weights, one shard per layer.
    `overrides` change config keys (narrower widths for a CPU run); `device` generates the weights there
    (cuda: seconds per MoE layer instead of minutes)."""
    from rdnac.testing.fp8 import _StreamingSafetensors, _generator, _write_byte_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = {**V3_SHAPE, "first_k_dense_replace": first_k_dense_replace, **overrides, "num_hidden_layers": layers}
    h, vocab = c["hidden_size"], c["vocab_size"]
    shards = [[("model.embed_tokens.weight", "embed", (vocab, h))]] + [_v3_layer_specs(i, c) for i in range(layers)]
    shards.append([("model.norm.weight", "norm", (h,)), ("lm_head.weight", "embed", (vocab, h))])
    dtypes = {"norm": torch.bfloat16, "router": torch.bfloat16, "embed": torch.bfloat16, "bias": torch.float32}
    weight_map = {}
    for index, specs in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = []
        for name, kind, shape in specs:
            if kind == "fp8":
                grid = (-(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1]))
                entries += [(name, torch.float8_e4m3fn, shape),
                            (name.removesuffix(".weight") + ".weight_scale_inv", torch.float32, grid)]
            else:
                entries.append((name, dtypes[kind], shape))
        writer = _StreamingSafetensors(out / filename, entries)
        for name, kind, shape in specs:
            g = _generator(seed, name)
            if kind == "fp8":
                bits, scale = _random_fp8_block(shape, g, device)
                writer.write(name, bits)
                writer.write(name.removesuffix(".weight") + ".weight_scale_inv", scale)
            elif kind == "embed":
                for start in range(0, vocab, 16384):  # in row chunks: [V, H] is the largest float tensor
                    rows = min(16384, vocab - start)
                    writer.write(name, (0.02 * torch.randn((rows, h), generator=g)).to(torch.bfloat16))
            elif kind == "norm":
                writer.write(name, (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16))
            elif kind == "router":
                writer.write(name, (h ** -0.5 * torch.randn(shape, generator=g)).to(torch.bfloat16))
            else:
                writer.write(name, 0.1 * torch.randn(shape, generator=g))
            weight_map.update({e[0]: filename for e in entries})
        writer.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "torch_dtype": "bfloat16",
              "hidden_act": "silu", "tie_word_embeddings": False, "num_nextn_predict_layers": 0,
              "moe_layer_freq": 1, "attention_bias": False, "quantization_config": dict(QUANTIZATION_CONFIG), **c}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_byte_tokenizer(out)
    return out
