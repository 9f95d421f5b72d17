"""The GPU machine's random MoE checkpoints (rdnac.testing.moe) load into transformers as the Hub's do,
and rdnac's MXFP4 codec (rdnac.ir.mxfp4) reads their expert weights exactly as transformers does."""

from __future__ import annotations

import glob

import pytest
import torch
from safetensors.torch import load_file

from rdnac.ir import mxfp4
from rdnac.testing.moe import dequantized_expert, write_random_moe_checkpoint

transformers = pytest.importorskip("transformers")


def _load(path, **kw):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                    output_loading_info=True, **kw)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    return model


@pytest.mark.parametrize("shape,scheme", [("qwen3-moe-tiny", "bf16"), ("gpt-oss-tiny", "bf16")])
def test_random_moe_checkpoints_load_into_transformers(tmp_path, shape, scheme):
    model = _load(write_random_moe_checkpoint(tmp_path, shape, scheme, layers=1))
    logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.isfinite().all() and logits.std() > 0.05  # activations of unit scale, not vanishing


def test_mxfp4_codec_reads_experts_as_transformers_does(tmp_path):
    path = write_random_moe_checkpoint(tmp_path, "gpt-oss-tiny", "mxfp4", layers=1)
    model = _load(path, quantization_config=transformers.Mxfp4Config(dequantize=True))
    tensors = {}
    for f in glob.glob(str(path / "*.safetensors")):
        tensors.update(load_file(f))
    experts = model.model.layers[0].mlp.experts
    p = "model.layers.0.mlp.experts"
    for proj in ("gate_up_proj", "down_proj"):
        scales = tensors[f"{p}.{proj}_scales"]
        assert len(scales.unique()) > 1  # not all one exponent: a misread scale would show
        ours = dequantized_expert(tensors[f"{p}.{proj}_blocks"], scales)  # [E, N, K]
        assert torch.equal(getattr(experts, proj).float(), ours.transpose(1, 2)), proj  # transformers: [E, K, N]


def test_mxfp4_quantize_keeps_representable_values_and_never_saturates():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 96, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    blocks, scales = mxfp4.quantize(w)
    deq = mxfp4.dequantize(blocks, scales)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(deq)), deq)  # representable values come back exactly
    # no element saturates: the error of each block is at most half the gap between its two largest codes
    blockwise = (deq - w).abs().reshape(6, 3, 32).amax(-1)
    step = torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.int() - 127)
    assert (blockwise <= step + 1e-12).all()
    assert torch.equal(mxfp4.dequantize(torch.tensor([[0x21] * 16], dtype=torch.uint8),
                                        torch.tensor([[128]], dtype=torch.uint8))[0, :2], torch.tensor([1.0, 2.0]))
