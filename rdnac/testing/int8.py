"""INT8 W8A8 checkpoints in the layout llm-compressor writes (compressed-tensors, format "int-quantized").

    deq = write_int8_checkpoint(float_dir, out_dir, seed=0)   # -> dequantized weights (float32)

config.json gets llm-compressor's W8A8 int8 `quantization_config`: one config group targeting Linear,
weights int 8-bit symmetric per channel (static, minmax observer), input activations int 8-bit symmetric
per token and dynamic, `ignore` [lm_head, a Gated DeltaNet layer's in_proj]. Each quantized linear stores
`weight` int8 [N, K] (I8) and `weight_scale` [N, 1] in the checkpoint's float dtype, W ~= weight *
weight_scale. The decoder's linears are quantized (`layers.N.self_attn.*_proj`, `mlp.*_proj`,
`linear_attn.*_proj*`); embeddings, norms, lm_head, the GDN in_proj and any vision tower stay as they
were. Scales are amax/127 times a seeded factor in [1, 1.25) (as `rdnac.testing.fp8`), so a scale applied
to the wrong tensor shows. The returned dequantized weights (float32, every tensor) load into
transformers as the reference. Same seed, same bytes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from rdnac.compiler.passes.quantize import quantize_weight
from rdnac.testing.fp8 import _SIDE_FILES, _VISION, _headroom, _read_source

_LINEAR = re.compile(r"(.*\.)?layers\.\d+\.(self_attn|mlp|linear_attn)\.\w+_proj\w*\.weight")
# llm-compressor's recipe for hybrid models keeps the GDN input projections in float (they feed the recurrence)
IGNORE = ("lm_head", r"re:.*linear_attn\.in_proj.*", r"re:.*shared_expert_gate$")


def quantization_config(ignore: list[str]) -> dict:
    """The `quantization_config` block of config.json, keys as llm-compressor writes them for W8A8 int8."""
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "group_size": None, "block_structure": None, "actorder": None,
                            "observer": "minmax", "observer_kwargs": {}},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True, "group_size": None, "block_structure": None,
                                      "actorder": None, "observer": None, "observer_kwargs": {}},
                "output_activations": None}},
            "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None}


def _ignored(module: str, ignore: list[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


def write_int8_checkpoint(src: str | Path | dict[str, torch.Tensor], out_dir: str | Path, seed: int = 0, *,
                          config: dict | None = None, ignore: list[str] = ()) -> dict[str, torch.Tensor]:
    """Quantize the decoder linears of a float checkpoint (a directory, or a state dict plus `config`) to
    int8 W8A8 into `out_dir`; returns every tensor dequantized to float32 (the reference weights).
    ignore: extra modules left in float (names, or llm-compressor's "re:" regexes)."""
    tensors, config, src_dir = _read_source(src, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ignore = [*IGNORE, *ignore]
    written: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in sorted(tensors.items()):
        module = name.removesuffix(".weight")
        if not _LINEAR.fullmatch(name) or any(v in name for v in _VISION) or _ignored(module, ignore):
            written[name] = t.contiguous()
            dequantized[name] = t.float()
            continue
        bits, scale = quantize_weight(t, "channel", fmt="int8", headroom=_headroom(seed, name, (t.shape[0],)))
        stored_scale = scale.to(t.dtype).reshape(-1, 1)  # [N, 1] in the checkpoint's dtype
        written[name] = bits
        written[f"{module}.weight_scale"] = stored_scale
        dequantized[name] = bits.float() * stored_scale.float()
    save_file(written, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config)
    config["quantization_config"] = quantization_config(ignore)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if src_dir is not None:
        for side in _SIDE_FILES:
            if (src_dir / side).exists():
                shutil.copyfile(src_dir / side, out / side)
    return dequantized
