"""MXFP4 checkpoints in the layout GPT-OSS ships, for tests and GPU benchmarks.

    write_mxfp4_checkpoint(float_dir, out_dir)

The experts of a float GPT-OSS checkpoint (transformers' x @ W layout:
`mlp.experts.gate_up_proj [E, H, 2I]` with gate/up columns interleaved,
`mlp.experts.down_proj [E, I, H]`) are transposed to [E, N, K] rows and
quantized along K with `rdnac.ir.mxfp4.quantize`, then written as the Hub's
openai/gpt-oss-20b stores them:

| tensor                           | dtype | shape                |
|----------------------------------|-------|----------------------|
| mlp.experts.gate_up_proj_blocks  | U8    | [E, 2I, H/32, 16]    |
| mlp.experts.gate_up_proj_scales  | U8    | [E, 2I, H/32]        |
| mlp.experts.down_proj_blocks     | U8    | [E, H, I/32, 16]     |
| mlp.experts.down_proj_scales     | U8    | [E, H, I/32]         |
| everything else (biases, sinks…) | BF16  | as in the float file |

in shards with `model.safetensors.index.json`, and config.json gains
`quantization_config` {quant_method: mxfp4, modules_to_not_convert: [...]}
(the converter's list). Rows stay interleaved (gate, up, gate, up...) as on
the Hub. Same input, same bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rdnac.ir.mxfp4 import BLOCK, quantize

EXPERT_PROJECTIONS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "chat_template.jinja", "chat_template.json")


def _read(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [E, N, K/32, 16], scales uint8 [E, N, K/32]) of an x @ W expert weight [E, K, N]."""
    rows = w.float().transpose(1, 2).contiguous()  # [E, N, K]
    e, n, k = rows.shape
    blocks, scales = quantize(rows)
    return blocks.reshape(e, n, k // BLOCK, 16), scales


def write_mxfp4_checkpoint(src: str | Path, out_dir: str | Path, num_shards: int = 2) -> Path:
    """Write the MXFP4 form of the float GPT-OSS checkpoint `src` to `out_dir`; returns `out_dir`."""
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, torch.Tensor] = {}
    for name, t in _read(src).items():
        if name.endswith(EXPERT_PROJECTIONS):
            written[f"{name}_blocks"], written[f"{name}_scales"] = quantize_experts(t)
        else:
            written[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
    names = sorted(written)
    shards = [names[i::num_shards] for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i:05d}-of-{num_shards - 1:05d}.safetensors"
        save_file({n: written[n].contiguous() for n in shard}, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
        total += sum(written[n].numel() * written[n].element_size() for n in shard)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for side in _SIDE_FILES:
        if (src / side).exists():
            shutil.copy(src / side, out / side)
    return out
