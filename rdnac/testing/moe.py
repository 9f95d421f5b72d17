"""Random mixture-of-experts checkpoints of real shapes, in the Hub's layouts, for the GPU machine.

    python -m rdnac.testing.moe OUT --shape qwen3-30b-a3b --scheme bf16 --layers 12
    python -m rdnac.testing.moe OUT --shape gpt-oss-20b --scheme mxfp4

Real checkpoints do not reach the GPU machine (GPU.md), so its MoE benchmarks
generate their weights there, one layer at a time (peak memory ~ one layer):

- Qwen3MoeForCausalLM as Qwen/Qwen3-30B-A3B is published: per-expert linears
  `mlp.experts.E.{gate,up,down}_proj.weight`, router `mlp.gate.weight`.
- GptOssForCausalLM as openai/gpt-oss-20b is published: `mlp.router.{weight,
  bias}`, experts `mlp.experts.gate_up_proj_{blocks,scales,bias}` (gate and up
  interleaved by row) and `down_proj_{blocks,scales,bias}`, blocks
  [E, N, K/32, 16] uint8 and e8m0 scales [E, N, K/32], attention biases and
  `self_attn.sinks`, alternating 128-token sliding and full layers, YaRN RoPE.
  Scheme bf16 writes the bf16 layout of the same model (`gate_up_proj` [E, H, 2I],
  `down_proj` [E, I, H]) for the 4-bit against 16-bit comparison.

`layers` cuts the depth (a 30B model in bf16 does not fit the machine's disk
next to its plan); every layer keeps its real width. Same seed, same bytes.
`decisive=True` gives the peaked predictions of a trained model (as
`rdnac.testing.fp8` does for dense models): unit-scale embeddings, the
attention output and expert down projections scaled by a tenth (MXFP4: their
scales lowered by 3, an eighth), and lm_head row j the embedding row of token
(7919 j + 1) mod V, so greedy tokens are a stable comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rdnac.ir import mxfp4
from rdnac.testing.fp8 import (DECISIVE_RESIDUAL_SCALE, DECISIVE_STRIDE, _generator, _StreamingSafetensors,
                               _write_byte_tokenizer)

SHAPES = {
    "qwen3-30b-a3b": dict(arch="Qwen3MoeForCausalLM", hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128,
                          experts=128, top_k=8, expert_intermediate=768, vocab=151936),
    "gpt-oss-20b": dict(arch="GptOssForCausalLM", hidden=2880, layers=24, heads=64, kv_heads=8, head_dim=64,
                        experts=32, top_k=4, expert_intermediate=2880, vocab=201088),
    "qwen3-moe-tiny": dict(arch="Qwen3MoeForCausalLM", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                           experts=16, top_k=4, expert_intermediate=128, vocab=512),
    "gpt-oss-tiny": dict(arch="GptOssForCausalLM", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                         experts=16, top_k=4, expert_intermediate=256, vocab=512),
}
_F32, _BF16, _U8 = torch.float32, torch.bfloat16, torch.uint8


def _config(s: dict, layers: int) -> dict:
    common = {"architectures": [s["arch"]], "hidden_size": s["hidden"], "num_hidden_layers": layers,
              "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
              "vocab_size": s["vocab"], "rms_norm_eps": 1e-6 if s["arch"] == "Qwen3MoeForCausalLM" else 1e-5,
              "tie_word_embeddings": False, "attention_bias": s["arch"] == "GptOssForCausalLM",
              "torch_dtype": "bfloat16", "hidden_act": "silu"}
    if s["arch"] == "Qwen3MoeForCausalLM":
        return {**common, "model_type": "qwen3_moe", "intermediate_size": 6144, "max_position_embeddings": 40960,
                "rope_theta": 1000000.0, "num_experts": s["experts"], "num_experts_per_tok": s["top_k"],
                "moe_intermediate_size": s["expert_intermediate"], "norm_topk_prob": True,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}
    return {**common, "model_type": "gpt_oss", "intermediate_size": s["expert_intermediate"],
            "num_local_experts": s["experts"], "num_experts_per_tok": s["top_k"], "experts_per_token": s["top_k"],
            "sliding_window": 128, "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                   for i in range(layers)],
            "max_position_embeddings": 131072, "swiglu_limit": 7.0, "rope_theta": 150000.0,
            "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "original_max_position_embeddings": 4096, "truncate": False}}


def _layer_specs(i: int, s: dict, scheme: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    h, d, e, inter = s["hidden"], s["head_dim"], s["experts"], s["expert_intermediate"]
    p = f"model.layers.{i}"
    specs = [(f"{p}.input_layernorm.weight", _BF16, (h,)), (f"{p}.post_attention_layernorm.weight", _BF16, (h,))]
    attn = [("q_proj", s["heads"] * d, h), ("k_proj", s["kv_heads"] * d, h), ("v_proj", s["kv_heads"] * d, h),
            ("o_proj", h, s["heads"] * d)]
    specs += [(f"{p}.self_attn.{name}.weight", _BF16, (n, k)) for name, n, k in attn]
    if s["arch"] == "Qwen3MoeForCausalLM":
        specs += [(f"{p}.self_attn.q_norm.weight", _BF16, (d,)), (f"{p}.self_attn.k_norm.weight", _BF16, (d,)),
                  (f"{p}.mlp.gate.weight", _BF16, (e, h))]
        for j in range(e):
            specs += [(f"{p}.mlp.experts.{j}.gate_proj.weight", _BF16, (inter, h)),
                      (f"{p}.mlp.experts.{j}.up_proj.weight", _BF16, (inter, h)),
                      (f"{p}.mlp.experts.{j}.down_proj.weight", _BF16, (h, inter))]
        return specs
    specs += [(f"{p}.self_attn.{name}.bias", _BF16, (n,)) for name, n, _ in attn]
    specs += [(f"{p}.self_attn.sinks", _BF16, (s["heads"],)), (f"{p}.mlp.router.weight", _BF16, (e, h)),
              (f"{p}.mlp.router.bias", _BF16, (e,))]
    x = f"{p}.mlp.experts"
    if scheme == "mxfp4":
        specs += [(f"{x}.gate_up_proj_blocks", _U8, (e, 2 * inter, h // 32, 16)),
                  (f"{x}.gate_up_proj_scales", _U8, (e, 2 * inter, h // 32)),
                  (f"{x}.gate_up_proj_bias", _BF16, (e, 2 * inter)),
                  (f"{x}.down_proj_blocks", _U8, (e, h, inter // 32, 16)),
                  (f"{x}.down_proj_scales", _U8, (e, h, inter // 32)),
                  (f"{x}.down_proj_bias", _BF16, (e, h))]
    else:
        specs += [(f"{x}.gate_up_proj", _BF16, (e, h, 2 * inter)), (f"{x}.gate_up_proj_bias", _BF16, (e, 2 * inter)),
                  (f"{x}.down_proj", _BF16, (e, inter, h)), (f"{x}.down_proj_bias", _BF16, (e, h))]
    return specs


def _tensor(name: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int, decisive: bool,
            device: str = "cpu") -> torch.Tensor:
    t = _random(name, dtype, shape, seed, device)
    if decisive and name.endswith(("o_proj.weight", "down_proj", "down_proj.weight", "down_proj_bias")):
        t = (t.float() * DECISIVE_RESIDUAL_SCALE).to(dtype)
    elif decisive and name.endswith("down_proj_scales"):
        t = t - 3  # an eighth: e8m0 scales are exponents
    return t


def _random(name: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    g = _generator(seed, name)
    if device != "cpu":
        g = torch.Generator(device).manual_seed(g.initial_seed())
    kw = {"generator": g, "device": device}
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * torch.randn(shape, **kw)).to(dtype)
    if name.endswith(("bias", "sinks")):
        return (0.1 * torch.randn(shape, **kw)).to(dtype)
    if name.endswith("_blocks"):  # uniform e2m1 codes
        return torch.randint(0, 256, shape, dtype=torch.int32, **kw).to(_U8)
    if name.endswith("_scales"):
        # element std ~2.3 x 2**(s - 127): s near 127 - log2(2.3 sqrt(K)) keeps activations of unit scale
        k = shape[-1] * 32
        centre = 127 - round(torch.log2(torch.tensor(2.3 * k ** 0.5)).item())
        return torch.randint(centre - 1, centre + 2, shape, dtype=torch.int32, **kw).to(_U8)
    fan_in = shape[1] if name.endswith("gate_up_proj") or name.endswith("down_proj") else shape[-1]
    return ((fan_in ** -0.5) * torch.randn(shape, **kw)).to(dtype)


def write_random_moe_checkpoint(out_dir: str | Path, shape: str, scheme: str = "bf16", layers: int | None = None,
                                seed: int = 0, decisive: bool = False, device: str = "cpu") -> Path:
    """Config, tokenizer and one safetensors shard per layer of the MoE model `shape` (SHAPES). `device`
    "cuda" draws the layers' tensors on the GPU (other values than on the cpu, from the same seeds; seconds
    instead of a minute for a few real-width layers)."""
    s = SHAPES[shape]
    if scheme not in ("bf16", "mxfp4") or (scheme == "mxfp4" and s["arch"] != "GptOssForCausalLM"):
        raise ValueError(f"scheme requires bf16 (any shape) or mxfp4 (GPT-OSS shapes); got {scheme!r} for {shape}")
    layers = layers or s["layers"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(s, layers)
    if scheme == "mxfp4":
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    h, v = s["hidden"], s["vocab"]
    shards = [[("model.embed_tokens.weight", _BF16, (v, h))]]
    shards += [_layer_specs(i, s, scheme) for i in range(layers)]
    shards.append([("model.norm.weight", _BF16, (h,)), ("lm_head.weight", _BF16, (v, h))])
    weight_map = {}
    for index, specs in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = _StreamingSafetensors(out / filename, specs)
        for name, dtype, tensor_shape in specs:
            weight_map[name] = filename
            if name == "lm_head.weight" and decisive:
                for start in range(0, v, 16384):  # row j = embedding row (a*j + b) mod V
                    rows = torch.arange(start, min(start + 16384, v))
                    writer.write(name, embedding[(DECISIVE_STRIDE * rows + 1) % v])
                continue
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                chunks = []
                for start in range(0, v, 16384):  # in row chunks: [V, H] is the largest tensor
                    rows = min(16384, v - start)
                    std = 1.0 if decisive else 0.02
                    chunks.append((std * torch.randn((rows, h), generator=_generator(seed, f"{name}@{start}")))
                                  .to(dtype))
                    writer.write(name, chunks[-1])
                    if not decisive:
                        chunks.clear()
                if decisive:
                    embedding = torch.cat(chunks)  # kept for the decisive lm_head
                continue
            writer.write(name, _tensor(name, dtype, tensor_shape, seed, decisive, device).cpu())
        writer.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_byte_tokenizer(out)
    return out


def dequantized_expert(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [E, N, K] of a checkpoint's [E, N, K/32, 16] blocks and [E, N, K/32] scales."""
    return mxfp4.dequantize(blocks.reshape(*blocks.shape[:-2], -1), scales)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rdnac.testing.moe", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--scheme", choices=["bf16", "mxfp4"], default="bf16")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the model has (same widths)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decisive", action="store_true", help="peaked predictions (stable greedy tokens)")
    args = parser.parse_args(argv)
    path = write_random_moe_checkpoint(args.out_dir, args.shape, args.scheme, args.layers, args.seed, args.decisive)
    print(f"wrote {path} ({args.shape}, {args.scheme})")


if __name__ == "__main__":
    main()
