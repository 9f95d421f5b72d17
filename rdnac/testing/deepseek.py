"""DeepSeek checkpoints in the native FP8 block layout, for tests (and, at real shapes, GPU benchmarks).

    deq = write_fp8_block_checkpoint(float_dir, out_dir, seed=0)   # -> dequantized weights (float32)

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
