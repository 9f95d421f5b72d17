"""FP8 checkpoints in the layouts real ones use, for tests and GPU benchmarks.

    deq = write_fp8_checkpoint(float_dir, out_dir, "fp8-block", seed=0)   # -> dequantized weights
    write_random_checkpoint(out_dir, **SHAPES["qwen3-8b"], scheme="fp8-block")

Schemes (config.json `quantization_config` and tensors as their tools write them):

| scheme                       | quantization_config                            | scale tensors              |
|------------------------------|------------------------------------------------|----------------------------|
| fp8-tensor                   | fp8, weight_block_size null, dynamic (static   | weight_scale [] (+ input_scale [] |
|                              | when input_scales are given)                   | when static)               |
| fp8-tensor-static-declared   | fp8, null, activation_scheme static, but no    | weight_scale [] only       |
|                              | input scales (Ministral-3-8B-Instruct-2512)    |                            |
| fp8-block                    | fp8, weight_block_size [128, 128], dynamic     | weight_scale_inv [N/128, K/128] |
| compressed-tensors-channel   | compressed-tensors, weights channel, dynamic   | weight_scale [N, 1]        |
|                              | per-token activations, ignore [lm_head]        |                            |

Only the decoder's linears (`layers.N.self_attn.*_proj`, `layers.N.mlp.*_proj`) are
quantized; lm_head, embeddings, norms and any vision tower stay as they were.
Scales are amax/448 times a seeded factor in [1, 1.25), so no two tensors
share a scale by construction and a scale applied to the wrong tensor shows up
as wrong values. The returned dequantized weights (float32, every tensor of the
checkpoint) load into transformers as the reference. Same seed, same bytes.

`python -m rdnac.testing.fp8 OUT --shapes qwen3-8b --scheme fp8-block` writes a
random checkpoint of real shapes, one layer at a time.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdnac.compiler.passes.quantize import quantize_weight
from rdnac.ir.fp8 import dequantize_weight

SCHEMES = ("fp8-tensor", "fp8-tensor-static-declared", "fp8-block", "compressed-tensors-channel")
BLOCK = (128, 128)
_LINEAR = re.compile(r"(.*\.)?layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
_VISION = ("vision_tower", "multi_modal_projector", "vision_model", "visual")
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja", "chat_template.json")


def _generator(seed: int, name: str) -> torch.Generator:
    """One stream per (seed, tensor name): a tensor's values do not depend on the order of writing.
    (torch's CPU generator keeps 32 bits of a seed, so both go through one 32-bit hash.)"""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))


def _headroom(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    return 1.0 + 0.25 * torch.rand(shape, generator=_generator(seed, name + "#scale"))


def _module_matches(module: str, patterns: list[str]) -> bool:
    return any(module == p or module.startswith(p + ".") or module.endswith("." + p) for p in patterns)


def _quantize(name: str, w: torch.Tensor, scheme: str, seed: int):
    """(bits, scale, weight_scheme, block_size) for one linear weight [N, K]."""
    weight_scheme = {"fp8-block": "block", "compressed-tensors-channel": "channel"}.get(scheme, "tensor")
    block = BLOCK if weight_scheme == "block" else None
    n, k = w.shape
    grid = {"tensor": (1,), "channel": (n,), "block": (-(-n // BLOCK[0]), -(-k // BLOCK[1]))}[weight_scheme]
    bits, scale = quantize_weight(w, weight_scheme, block, headroom=_headroom(seed, name, grid))
    return bits, scale, weight_scheme, block


def quantization_config(scheme: str, ignore: list[str], is_static: bool = False) -> dict:
    """The `quantization_config` block of config.json for `scheme`, keys as the real tools write them."""
    if scheme in ("fp8-tensor", "fp8-tensor-static-declared", "fp8-block"):
        static = is_static or scheme == "fp8-tensor-static-declared"
        return {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
                "weight_block_size": list(BLOCK) if scheme == "fp8-block" else None,
                "modules_to_not_convert": list(ignore)}
    if scheme == "compressed-tensors-channel":
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                "dynamic": False, "group_size": None, "block_structure": None, "observer": "minmax"},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                          "dynamic": True, "group_size": None, "observer": None},
                    "output_activations": None}},
                "ignore": list(ignore), "kv_cache_scheme": None}
    raise ValueError(f"scheme requires one of {SCHEMES}; got {scheme!r}")


def _read_source(src, config: dict | None) -> tuple[dict[str, torch.Tensor], dict, Path | None]:
    if isinstance(src, dict):
        assert config is not None, "a state dict source requires config"
        return dict(src), dict(config), None
    directory = Path(src)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors, config or json.loads((directory / "config.json").read_text()), directory


def write_fp8_checkpoint(src: str | Path | dict[str, torch.Tensor], out_dir: str | Path, scheme: str, seed: int = 0,
                         *, config: dict | None = None, input_scales: dict[str, float] | None = None,
                         ignore: list[str] = (), store_as: str = "float8",
                         scale_names: str = "vllm") -> dict[str, torch.Tensor]:
    """Quantize the decoder linears of a float checkpoint (a directory, or a state dict plus `config`) into
    `out_dir` with `scheme`; returns every tensor dequantized to float32 (the reference weights).

    input_scales: {linear weight name: static input scale}, fp8-tensor only; makes activation_scheme static.
    ignore: extra modules left in float (listed in modules_to_not_convert / ignore). store_as: "float8"
    (F8_E4M3) or "uint8" (the same bytes untyped). scale_names: "vllm" (weight_scale, input_scale) or
    "transformers" (weight_scale_inv, activation_scale; per-tensor schemes)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme requires one of {SCHEMES}; got {scheme!r}")
    assert store_as in ("float8", "uint8") and scale_names in ("vllm", "transformers")
    assert not input_scales or scheme == "fp8-tensor", "input_scales require scheme fp8-tensor"
    tensors, config, src_dir = _read_source(src, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ignore = ["lm_head", *ignore]
    per_tensor_names = {"vllm": ("weight_scale", "input_scale"),
                        "transformers": ("weight_scale_inv", "activation_scale")}[scale_names]
    written: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in sorted(tensors.items()):
        module = name.removesuffix(".weight")
        if (not _LINEAR.fullmatch(name) or any(v in name for v in _VISION) or _module_matches(module, ignore)):
            written[name] = t.contiguous()
            dequantized[name] = t.float()
            continue
        bits, scale, weight_scheme, block = _quantize(name, t, scheme, seed)
        dequantized[name] = dequantize_weight(bits, scale, weight_scheme, block)
        written[name] = bits.view(torch.uint8) if store_as == "uint8" else bits
        if weight_scheme == "tensor":
            written[f"{module}.{per_tensor_names[0]}"] = scale.reshape(())
            if input_scales:
                written[f"{module}.{per_tensor_names[1]}"] = torch.tensor(float(input_scales[name]))
        elif weight_scheme == "block":
            written[f"{module}.weight_scale_inv"] = scale  # multiplies the weight, despite the name
        else:
            written[f"{module}.weight_scale"] = scale.reshape(-1, 1)
    save_file(written, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config)
    config["quantization_config"] = quantization_config(scheme, ignore, is_static=bool(input_scales))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if src_dir is not None:
        for side in _SIDE_FILES:
            if (src_dir / side).exists():
                shutil.copyfile(src_dir / side, out / side)
    return dequantized


# ---------------------------------------------------------------- random checkpoints of real shapes

SHAPES = {
    "qwen3-8b": dict(arch="Qwen3ForCausalLM", hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128,
                     intermediate=12288, vocab=151936),
    "llama3-8b": dict(arch="LlamaForCausalLM", hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128,
                      intermediate=14336, vocab=128256),
    "ministral3-8b": dict(arch="MistralForCausalLM", hidden=4096, layers=34, heads=32, kv_heads=8, head_dim=128,
                          intermediate=14336, vocab=131072),
    "smollm2": dict(arch="LlamaForCausalLM", hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                    intermediate=1536, vocab=49152),
    "tiny": dict(arch="Qwen3ForCausalLM", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
                 intermediate=384, vocab=512),
}
_MODEL_TYPES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama",
                "MistralForCausalLM": "mistral"}
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8"}


class _StreamingSafetensors:
    """Writes one safetensors file whose tensors are produced one at a time (header first, then data),
    so a 1.2 GB embedding never has to sit in memory next to the rest."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        for name, dtype, shape in specs:
            size = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((-len(raw)) % 8)
        self._file = path.open("wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._order = [name for name, _, _ in specs]
        self._header = header
        self._current, self._left = None, 0

    def write(self, name: str, t: torch.Tensor) -> None:
        """Write tensor `name`, whole or as consecutive row chunks, in the order of the specs."""
        if self._current is None:
            assert name == self._order.pop(0), f"{name} written out of order"
            spec = self._header[name]
            self._current, self._left = name, spec["data_offsets"][1] - spec["data_offsets"][0]
        spec = self._header[name]
        assert name == self._current and list(t.shape[1:]) == spec["shape"][1:] and _ST_DTYPES[t.dtype] == spec["dtype"]
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        self._left -= len(data)
        assert self._left >= 0, f"{name}: more data than its shape"
        self._file.write(data)
        if self._left == 0:
            self._current = None

    def close(self) -> None:
        assert not self._order and self._current is None, f"tensors never written: {self._order or self._current}"
        self._file.close()


def _layer_specs(i: int, c: dict, scheme: str | None, arch: str):
    """(name, dtype, shape, kind) of decoder layer i; kind is "norm", "bias", "linear" or "scale"."""
    h, d, inter = c["hidden"], c["head_dim"], c["intermediate"]
    p = f"model.layers.{i}"
    linears = [(f"{p}.self_attn.q_proj", c["heads"] * d, h), (f"{p}.self_attn.k_proj", c["kv_heads"] * d, h),
               (f"{p}.self_attn.v_proj", c["kv_heads"] * d, h), (f"{p}.self_attn.o_proj", h, c["heads"] * d),
               (f"{p}.mlp.gate_proj", inter, h), (f"{p}.mlp.up_proj", inter, h), (f"{p}.mlp.down_proj", h, inter)]
    specs = [(f"{p}.input_layernorm.weight", torch.bfloat16, (h,), "norm"),
             (f"{p}.post_attention_layernorm.weight", torch.bfloat16, (h,), "norm")]
    if arch == "Qwen3ForCausalLM":
        specs += [(f"{p}.self_attn.q_norm.weight", torch.bfloat16, (d,), "norm"),
                  (f"{p}.self_attn.k_norm.weight", torch.bfloat16, (d,), "norm")]
    for module, n, k in linears:
        if scheme is None:
            specs.append((f"{module}.weight", torch.bfloat16, (n, k), "linear"))
        else:
            specs.append((f"{module}.weight", torch.float8_e4m3fn, (n, k), "linear"))
            grid = (-(-n // BLOCK[0]), -(-k // BLOCK[1]))
            specs.append((f"{module}.weight_scale_inv", torch.float32, grid, "scale") if scheme == "fp8-block"
                         else (f"{module}.weight_scale", torch.float32, (), "scale"))
    if arch == "Qwen2ForCausalLM":  # q/k/v biases, left in bf16 by FP8 checkpoints (only weights are quantized)
        specs += [(f"{module}.bias", torch.bfloat16, (n,), "bias") for module, n, _ in linears[:3]]
    return specs


DECISIVE_RESIDUAL_SCALE = 0.1
DECISIVE_STRIDE = 7919  # a prime: j -> (7919 j + 1) mod V is a permutation for any vocab it does not divide


def write_random_checkpoint(out_dir: str | Path, arch: str = "Qwen3ForCausalLM", hidden: int = 4096,
                            layers: int = 36, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                            intermediate: int = 12288, vocab: int = 151936, scheme: str | None = None,
                            seed: int = 0, decisive: bool = False) -> Path:
    """A random HF checkpoint of real shapes (bf16, or FP8 linears with scheme fp8-block / fp8-tensor),
    one safetensors shard per layer, written while generated (peak memory ~ one layer).

    Random weights give flat next-token distributions (top-2 logit gaps of a few hundredths), where any
    two correct implementations that round differently pick different greedy tokens. `decisive=True`
    gives the peaked predictions a trained model has, so greedy tokens are a stable comparison: the
    embedding is unit-scale, o_proj/down_proj are scaled by DECISIVE_RESIDUAL_SCALE (each layer adds a
    perturbation of about a tenth of the token's embedding norm to the residual stream), and lm_head
    row j is the embedding row of token (a*j + b) mod vocab, so each token predicts a fixed other token
    by a wide margin while every layer still shapes the logits."""
    if arch not in _MODEL_TYPES:
        raise ValueError(f"arch requires one of {sorted(_MODEL_TYPES)}; got {arch!r}")
    if scheme not in (None, "fp8-block", "fp8-tensor"):
        raise ValueError(f"scheme requires None, fp8-block or fp8-tensor; got {scheme!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate)
    config = {"architectures": [arch], "model_type": _MODEL_TYPES[arch], "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "hidden_act": "silu",
              "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16"}
    if scheme:
        config["quantization_config"] = quantization_config(scheme, ["lm_head"])
    shards = [[("model.embed_tokens.weight", torch.bfloat16, (vocab, hidden), "embedding")]]
    shards += [_layer_specs(i, c, scheme, arch) for i in range(layers)]
    shards.append([("model.norm.weight", torch.bfloat16, (hidden,), "norm"),
                   ("lm_head.weight", torch.bfloat16, (vocab, hidden), "embedding")])
    weight_map = {}
    for index, specs in enumerate(shards):
        filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = _StreamingSafetensors(out / filename, [(n, dt, sh) for n, dt, sh, _ in specs])
        pending_scale: dict[str, torch.Tensor] = {}
        for name, dtype, shape, kind in specs:
            weight_map[name] = filename
            if kind == "norm":
                t = 1.0 + 0.1 * torch.randn(shape, generator=_generator(seed, name))
            elif kind == "bias":
                t = 0.1 * torch.randn(shape, generator=_generator(seed, name))
            elif kind == "embedding" and decisive and name == "lm_head.weight":
                for start in range(0, shape[0], 16384):  # row j = embedding row (a*j + b) mod V
                    rows = torch.arange(start, min(start + 16384, shape[0]))
                    writer.write(name, embedding[(DECISIVE_STRIDE * rows + 1) % shape[0]])
                continue
            elif kind == "embedding":  # in row chunks: [V, H] is the largest tensor
                std = 1.0 if decisive else 0.02
                chunks = []
                for start in range(0, shape[0], 16384):
                    rows = min(16384, shape[0] - start)
                    chunks.append((std * torch.randn((rows, shape[1]), generator=_generator(seed, f"{name}@{start}")))
                                  .bfloat16())
                    writer.write(name, chunks[-1])
                    if not decisive:
                        chunks.clear()
                embedding = torch.cat(chunks) if decisive else None  # kept for the decisive lm_head
                continue
            elif kind == "scale":
                writer.write(name, pending_scale.pop(name))
                continue
            else:
                t = (shape[1] ** -0.5) * torch.randn(shape, generator=_generator(seed, name))
                if decisive and name.endswith(("o_proj.weight", "down_proj.weight")):
                    t = t * DECISIVE_RESIDUAL_SCALE
                if scheme:
                    bits, scale, weight_scheme, block = _quantize(name, t, scheme, seed)
                    module = name.removesuffix(".weight")
                    key = f"{module}.weight_scale_inv" if weight_scheme == "block" else f"{module}.weight_scale"
                    pending_scale[key] = scale if weight_scheme == "block" else scale.reshape(())
                    writer.write(name, bits)
                    continue
            writer.write(name, t.to(dtype))
        writer.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_byte_tokenizer(out)
    return out


def _write_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer with no merges (256 tokens + specials): any vocab >= 259 can use it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(directory / "tokenizer.json"))
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template}))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rdnac.testing.fp8", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="qwen3-8b")
    parser.add_argument("--scheme", choices=["bf16", "fp8-block", "fp8-tensor"], default="fp8-block")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_random_checkpoint(args.out_dir, **SHAPES[args.shapes],
                                   scheme=None if args.scheme == "bf16" else args.scheme, seed=args.seed)
    print(f"wrote {path} ({args.shapes}, {args.scheme})")


if __name__ == "__main__":
    main()
